"""`evaluate`: the Python twin of `safepatch eval MODEL`.

Load suites -> drop prompts found in the training data -> take a fixed subset -> generate
(resumable) -> judge (one outcome per completion, eval.outcome; optional guard for harm) ->
metrics -> utility perplexity -> results.json + results.md in the output directory.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .config import DEFAULT_SUITES
from .generate import (GenerationCache, GenerationSettings, generate_completions, load_model,
                       model_fingerprint)
from .judge import GuardJudge, load_guard
from .judge_models import check_judge, load_judge
from .outcome import Judge
from .report import SCHEMA, summarise, write_result
from .suites import (DEFAULT_FUZZY_THRESHOLD, TrainingIndex, deduplicate, fixed_subset,
                     load_suite, load_training_prompts)
from .utility import load_reference, reference_perplexity

log = logging.getLogger(__name__)


def evaluate(model_path: str | Path, out_dir: str | Path,
             suites: Sequence[str] = DEFAULT_SUITES, *, limit: int | None = None,
             subset_seed: int = 0, user_harmful: bool | None = True,
             dedup_against: Sequence[str | Path] = (),
             fuzzy_threshold: float = DEFAULT_FUZZY_THRESHOLD,
             settings: GenerationSettings = GenerationSettings(), batch_size: int = 8,
             device: str = "auto", dtype: str = "auto",
             judge: str | Judge = "v2", judge_model: str | None = None,
             guard: str | GuardJudge | None = None, guard_kind: str = "auto",
             utility: bool = True, utility_file: str | Path | None = None,
             utility_limit: int | None = None, utility_max_tokens: int = 256,
             cache_path: str | Path | None = None, label: str | None = None,
             threads: int | None = None, progress: bool = True,
             allow_pickle: bool = False) -> dict:
    """Evaluate one model directory; write results.json / results.md into `out_dir` and return
    the result dict.

    suites: packaged names (see suites.PACKAGED) or prompt files. limit: prompts per suite
    (fixed subset, after deduplication). dedup_against: training files whose prompts are
    removed (normalised exact match, then difflib ratio >= fuzzy_threshold). judge: the
    refusal judge, a name for judge_models.load_judge ("v2", "rules-v1", "classifier",
    "causal-lm" with judge_model = a local model directory) or a Judge. guard: a local
    guard model directory or a GuardJudge. The generation cache (default
    out_dir/generations.jsonl) makes a rerun resume per prompt. threads: CPU threads for
    torch (on a busy shared host 1 can be ~10x faster than an oversubscribed default).
    allow_pickle: load pickle weights (pytorch_model.bin) with torch.load(weights_only=True);
    refused by default, as merge refuses them."""
    t0 = time.time()
    if threads is not None:
        import torch
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    if not suites:
        raise ConfigError("no suites given")
    if isinstance(judge, str):
        check_judge(judge, judge_model)
    prompts, dedup_reports = [], []
    index = None
    if dedup_against:
        texts = [t for f in dedup_against for t in load_training_prompts(f)]
        index = TrainingIndex(texts)
    seen: dict[str, str] = {}
    for name in dict.fromkeys(suites):
        ps = load_suite(name, user_harmful=user_harmful)
        if ps and ps[0].suite in seen:
            raise ConfigError(f"suites {seen[ps[0].suite]} and {name} would both be reported as "
                              f"'{ps[0].suite}'; rename one file")
        if ps:
            seen[ps[0].suite] = name
        if index is not None:
            ps, rep = deduplicate(ps, index, fuzzy_threshold)
            dedup_reports.append(rep)
            log.info("%s: removed %d exact and %d fuzzy duplicates of training prompts",
                     name, rep.removed_exact, rep.removed_fuzzy)
        prompts += fixed_subset(ps, limit, subset_seed)

    model, tok = load_model(model_path, device=device, dtype=dtype, allow_pickle=allow_pickle)
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    # the judge loads before generation: a bad judge option fails in seconds, not hours
    t_load = time.time()
    judge = load_judge(judge, judge_model, device=str(next(model.parameters()).device)) \
        if isinstance(judge, str) else judge
    judge_load_s = time.time() - t_load
    fp = model_fingerprint(model_path, dtype_name)
    cache = GenerationCache(cache_path or out_dir / "generations.jsonl")
    t_gen = time.time()
    with cache.locked():
        gens = generate_completions(model, tok, prompts, settings, fp, cache,
                                    batch_size=batch_size, progress=progress)
    timings = {"generate_s": time.time() - t_gen}

    t_judge = time.time()
    verdicts = judge.judge_batch([p.text for p in prompts], [g["completion"] for g in gens],
                                 [p.harmful for p in prompts])
    timings["judge_s"] = time.time() - t_judge + judge_load_s
    records = []
    for p, g, v in zip(prompts, gens, verdicts):
        records.append({"suite": p.suite, "id": p.id, "harmful": p.harmful, "prompt": p.text,
                        "completion": g["completion"], "n_new_tokens": g["n_new_tokens"],
                        "hit_eos": g["hit_eos"], "outcome": v.outcome,
                        "refusal_kind": v.refusal_kind, "judge_evidence": v.evidence,
                        "judge_score": v.score, "meta": p.meta})
    guard_name = None
    if guard is not None:
        g = load_guard(str(guard), guard_kind, device=str(next(model.parameters()).device)) \
            if isinstance(guard, (str, Path)) else guard
        guard_name = g.name
        verdicts = g.judge_batch([r["prompt"] for r in records],
                                 [r["completion"] for r in records])
        for r, gv in zip(records, verdicts):
            r["guard_harmful"], r["guard_raw"] = gv.harmful, gv.raw

    util = None
    t_util = time.time()
    if utility:
        pairs = load_reference(utility_file, utility_limit)
        util = reference_perplexity(model, tok, pairs, max_response_tokens=utility_max_tokens,
                                    chat_template=settings.chat_template, progress=progress)
        util["file"] = str(utility_file or "packaged: benign_reference_completions.jsonl")
    timings["utility_s"] = time.time() - t_util

    import torch
    import transformers
    summary = summarise(records)
    result = {
        "schema": SCHEMA, "model": str(model_path), "label": label or Path(model_path).name,
        "model_fingerprint": fp, "dtype": dtype_name,
        "device": str(next(model.parameters()).device),
        "settings": settings.key_fields() | {"batch_size": batch_size},
        "torch_threads": torch.get_num_threads(),
        "limit": limit, "subset_seed": subset_seed, "judge": judge.name,
        "judge_version": judge.version, "guard": guard_name,
        "dedup_against": [str(f) for f in dedup_against] or None,
        "dedup": [{"suite": d.suite, "before": d.before, "removed_exact": d.removed_exact,
                   "removed_fuzzy": d.removed_fuzzy, "after": d.after,
                   "fuzzy_threshold": d.fuzzy_threshold, "removed_ids": d.removed_ids}
                  for d in dedup_reports],
        **summary, "utility": util,
        "n_generated": sum(not g["cached"] for g in gens),
        "n_cached": sum(g["cached"] for g in gens),
        "wall_time_s": round(time.time() - t0, 1),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "records": records,
    }
    write_result(result, out_dir)
    return result
