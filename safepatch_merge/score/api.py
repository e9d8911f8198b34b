"""`score_patch`: the Python twin of `safepatch score` — saliency of a patch, as a score directory.

Loads the patched model (full checkpoint, or LoRA adapter merged into its backbone so scores
are over the merged weight), the scoring set (same loader, template and split as derive), runs
SNIP (or magnitude) and writes the directory the merge engine reads.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

from ..derive.dataset import data_identity, load_pairs, render_pairs, split_by_prompt
from ..derive.record import weights_sha256
from ..devices import resolve_device
from ..errors import ConfigError, DataError
from ..versions import TRAINING_LIBRARIES, versions
from ..models.loading import (adapter_base_path, check_model_dir, is_adapter_dir, load_patched_model,
                              load_tokenizer)
from .config import LOSSES, SALIENCY_ON, SPLITS, ScoreConfig  # noqa: F401 (the API's names)
from .distributed import scoring_processes
from .scoredir import write_score_dir
from .snip import checkpoint_tensor_names, magnitude_scores, scored_parameters

log = logging.getLogger("safepatch_merge.score")

# What each loss differentiates, as recorded in score_info.json.
DIFFERENTIATED = {
    "response_nll": "response tokens (the assistant turn after the generation prompt, up to and "
                    "including its end-of-turn token)",
    "question_nll": "the user question's own tokens: every token of the rendered prompt that "
                    "carries a character of the question; not the system turn (also a default "
                    "one the template inserts), role/turn markers or the generation prompt",
    "prompt_nll": "every token of the rendered prompt after the first: system turn, role and "
                  "turn markers, question, generation prompt",
}


def _backbone_from_record(patch: Path) -> str | None:
    rec = patch / "derive_record.json"
    if rec.is_file():
        return json.loads(rec.read_text()).get("backbone")
    if is_adapter_dir(patch):
        return adapter_base_path(patch)
    return None


def score_patch(patch: str | Path, out: str | Path, data: str | Path | None = None,
                backbone: str | Path | None = None, config: ScoreConfig | None = None,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Score a patched model and write the score directory at `out`; returns score_info.

    patch: patched model directory (full checkpoint) or LoRA adapter directory.
    data: harmful pairs (JSONL/JSON/CSV or dataset name); not needed for loss 'magnitude'.
    backbone: the unpatched model; defaults to the one in the patch's derive_record.json (or
    the adapter's base). Needed for adapters and for 'magnitude'.
    Under a launcher with several processes every rank calls it; rank 0 writes `out` and
    returns score_info, the others return None.
    """
    cfg = config or ScoreConfig()  # validated when it was built
    patch = Path(patch)
    if not patch.is_dir():
        raise ConfigError(f"patched model directory not found: {patch}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} exists; pass --overwrite to replace it")
    backbone = backbone or _backbone_from_record(patch)
    if backbone is not None:
        backbone = check_model_dir(backbone, "backbone")
    adapter = is_adapter_dir(patch)
    if not adapter:
        check_model_dir(patch, "patch")  # intact weights before any file is read
    if adapter and backbone is None:
        raise ConfigError(f"{patch} is a LoRA adapter that names no base model; pass --backbone")
    procs = scoring_processes(cfg)  # one process, or this rank's part of several
    device = resolve_device(cfg.device)

    info = {"patch": str(patch.resolve()), "backbone": str(backbone) if backbone else None,
            "loss": cfg.loss, "accumulation": cfg.accumulation if cfg.loss != "magnitude" else None}
    if cfg.loss == "magnitude":
        if backbone is None:
            raise ConfigError("loss magnitude needs the backbone (|θ_X − θ|); pass --backbone")
        if adapter:
            model, weights_dir = load_patched_model(patch, backbone, "float32", "cpu")
            names = checkpoint_tensor_names(weights_dir)
            params = scored_parameters(model, names, cfg.exclude, f"backbone {weights_dir}")
            scores = magnitude_scores(dict(params), None, backbone, list(params))
        else:
            names = checkpoint_tensor_names(patch)
            pat = re.compile(cfg.exclude) if cfg.exclude else None
            keep = [n for n in names if not (pat and pat.search(n))]
            scores = magnitude_scores(None, patch, backbone, keep)
        info.update(data=None, num_batches=0)
    else:
        if data is None:
            raise ConfigError(f"loss {cfg.loss} needs scoring data; pass --data")
        model, weights_dir = load_patched_model(patch, backbone, cfg.dtype,
                                                procs.load_device(device))
        tok_dir = patch if (patch / "tokenizer_config.json").is_file() else weights_dir
        tok = load_tokenizer(tok_dir, chat_template=cfg.chat_template)
        pairs = load_pairs(data, cfg.prompt_field, cfg.response_field, cfg.hf_split)
        if cfg.split != "all":
            tr, he = split_by_prompt(pairs, cfg.heldout, cfg.seed)
            pairs = tr if cfg.split == "train" else he
        if cfg.loss == "question_nll":  # a question answered several times counts once
            first: dict = {}
            for pr in pairs:
                first.setdefault(pr.prompt, pr)
            pairs = list(first.values())
        if cfg.limit is not None:
            pairs = pairs[: cfg.limit]
        examples, dropped = render_pairs(pairs, tok, cfg.max_length, cfg.system_prompt,
                                         locate_question=cfg.loss == "question_nll")
        if not examples:
            raise DataError(f"{data}: no scoring example fits max_length={cfg.max_length}")
        where = f"backbone {weights_dir}" if adapter else f"patch {patch}"
        model = procs.prepare(model, device)
        params = scored_parameters(model, checkpoint_tensor_names(weights_dir), cfg.exclude, where)
        scores, nb = procs.snip_scores(model, examples, tok.pad_token_id, params, cfg, progress)
        info.update(data={**data_identity(data), "num_examples": len(examples),
                          "split": cfg.split, "dropped_too_long": dropped},
                    num_batches=nb, differentiated=DIFFERENTIATED[cfg.loss])
        if procs.record is not None:
            info["distributed"] = procs.record
    with procs.together():  # rank 0 writes; a failure there ends every rank
        if procs.main:
            info["patch_sha256"] = weights_sha256(patch)
            info["patch_kind"] = "lora_merged" if adapter else "full"
            info["options"] = asdict(cfg)
            info["versions"] = versions(TRAINING_LIBRARIES)
            write_score_dir(out, scores, info, cfg.score_dtype, cfg.max_shard_size, overwrite)
    if not procs.main:
        return None
    return json.loads((out / "score_info.json").read_text())
