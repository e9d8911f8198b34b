"""`score_patch`: the Python twin of `safepatch score` — saliency of a patch, as a score directory.

Loads the patched model (full checkpoint, or LoRA adapter merged into its backbone so scores
are over the merged weight), the scoring set (same loader, template and split as derive), runs
SNIP (or magnitude) and writes the directory the merge engine reads.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..derive.dataset import data_identity, load_pairs, render_pairs, split_by_prompt
from ..derive.record import versions, weights_sha256
from ..errors import ConfigError, DataError
from ..models.loading import (adapter_base_path, check_model_dir, is_adapter_dir, load_patched_model,
                              load_tokenizer)
from .distributed import PARALLEL, scoring_processes
from .scoredir import SCORE_DTYPES, write_score_dir
from .snip import (ACCUMULATIONS, BUFFERS, checkpoint_tensor_names, magnitude_scores,
                   scored_parameters)

log = logging.getLogger("safepatch_merge.score")

LOSSES = ("response_nll", "question_nll", "prompt_nll", "magnitude")
SPLITS = ("all", "train", "heldout")
# `saliency_on` names the paper's choice of what SNIP differentiates; it sets `loss`.
SALIENCY_ON = {"responses": "response_nll", "questions": "question_nll"}


@dataclass
class ScoreConfig:
    """Options of one scoring run.

    loss: response_nll (default: NLL of D_h's response tokens) | question_nll (NLL of the
    user question's own tokens in the rendered chat template — no system prompt, role or
    turn markers, generation prompt; each distinct question once) | prompt_nll (NLL of every
    token of the rendered prompt: system turn, markers, question, generation prompt) |
    magnitude (|θ_X − θ|, needs the backbone).
    saliency_on: 'responses' | 'questions' — the same choice by what SNIP is computed on;
    it sets loss (response_nll / question_nll) and contradicting prompt_nll or magnitude is
    an error.
    split: which part of the data scores — all, or the train / heldout part of derive's split
    by prompt (same `heldout` fraction and `seed` give the same parts).
    dtype: dtype the patched model is loaded in ('auto' = as stored). score_dtype: stored dtype.
    exclude: regex of tensor names not to score (they are then not patched by the merge).
    score_buffers: 'device' (beside the model) or 'host' (host memory: a GPU then holds no
    fp32 score buffer, at the cost of copying every gradient down once per batch).
    parallel: how processes started by a launcher share the work — 'data' (each holds the
    model) or 'fsdp' (parameters sharded); dist_timeout: seconds a collective waits for a
    missing rank (score/distributed.py).
    """

    loss: str = "response_nll"
    saliency_on: str | None = None
    accumulation: str = "signed"
    batch_size: int = 8
    max_length: int = 512
    limit: int | None = None
    split: str = "all"
    heldout: float = 0.1
    seed: int = 0
    prompt_field: str = "prompt"
    response_field: str = "response"
    hf_split: str = "train"
    system_prompt: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    score_dtype: str = "float32"
    device: str = "auto"
    score_buffers: str = "device"
    exclude: str | None = None
    max_shard_size: str = "2GB"
    parallel: str = "data"
    dist_timeout: float = 1800.0

    def validate(self) -> None:
        if self.saliency_on is not None:
            if self.saliency_on not in SALIENCY_ON:
                raise ConfigError(f"saliency_on must be responses or questions, got "
                                  f"{self.saliency_on!r}")
            want = SALIENCY_ON[self.saliency_on]
            if self.loss not in ("response_nll", want):
                raise ConfigError(f"saliency_on {self.saliency_on} contradicts loss {self.loss}")
            self.loss = want
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.accumulation not in ACCUMULATIONS:
            raise ConfigError(f"accumulation must be signed or abs_per_batch, got {self.accumulation!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ConfigError(f"score dtype must be one of {', '.join(SCORE_DTYPES)}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("batch_size must be >= 1 and max_length >= 2")
        if self.score_buffers not in BUFFERS:
            raise ConfigError(f"score buffers must be device or host, got {self.score_buffers!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be data or fsdp, got {self.parallel!r}")
        self.saliency_on = {v: k for k, v in SALIENCY_ON.items()}.get(self.loss)


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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    return torch.device(name)


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
    cfg = config or ScoreConfig()
    cfg.validate()
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
    device = _resolve_device(cfg.device)

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
            info["versions"] = versions()
            write_score_dir(out, scores, info, cfg.score_dtype, cfg.max_shard_size, overwrite)
    if not procs.main:
        return None
    return json.loads((out / "score_info.json").read_text())
