"""Write a score directory (docs/design.md §3) that the merge engine reads as is.

Layout: `model.safetensors` or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
with scores under the model's own tensor names (float32 default), `histograms.safetensors`
(digit-0 radix histogram, int64 (65536,), per tensor under the same name), `score_info.json`.
Built in OUT.partial (files fsynced) and renamed to OUT only when complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..ops import radix_histogram
from ..derive.record import now_iso, write_json
from .config import SCORE_DTYPES as SCORE_DTYPE_NAMES

SCORE_DTYPES = {name: getattr(torch, name) for name in SCORE_DTYPE_NAMES}


def parse_size(size: str | int) -> int:
    """'2GB' / '40KB' / 123 -> bytes (decimal units, as transformers uses)."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ConfigError(f"bad size {size!r}; use e.g. 2GB, 500MB, 40KB") from None


def validate_scores(scores: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming the first tensor with a negative, NaN or infinite score."""
    for n, s in scores.items():
        if not bool(torch.isfinite(s).all()):
            raise CheckpointError(f"score of tensor {n} is not finite (NaN/inf gradient or weight)")
        if bool((s < 0).any()):
            raise CheckpointError(f"score of tensor {n} has negative values")


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_score_dir(out: str | Path, scores: dict[str, torch.Tensor], info: dict,
                    dtype: str = "float32", max_shard_size: str | int = "2GB",
                    overwrite: bool = False) -> Path:
    """Write `scores` ({stored tensor name: non-negative fp32 tensor}) as a score directory.

    info: the run's fields of score_info.json (patch, patch_sha256, backbone, loss,
    accumulation, data, num_batches); format, version, dtype, tensors and created are added.
    dtype: stored score dtype (float32 | bfloat16 | float16; fp16 underflows small scores).
    Returns the output path. Nothing appears at `out` unless the whole directory is written.
    """
    if dtype not in SCORE_DTYPES:
        raise ConfigError(f"score dtype must be one of {', '.join(SCORE_DTYPES)}, got {dtype!r}")
    out = Path(out)
    if not str(out).strip() or out.name in ("", ".", ".."):
        raise ConfigError(f"output {str(out)!r} names no directory of its own")
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} exists; pass --overwrite to replace it")
    if out.with_name(out.name + ".partial").is_symlink():
        raise ConfigError(f"{out}.partial is a symbolic link; refusing to write through it")
    limit = parse_size(max_shard_size)
    sdt = SCORE_DTYPES[dtype]
    stored = {n: s.detach().to("cpu", sdt) for n, s in scores.items()}
    validate_scores(stored)  # after the cast: fp16 can overflow to inf

    shards: list[list[str]] = [[]]
    size = 0
    for n, s in stored.items():
        nbytes = s.numel() * s.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        _save({n: stored[n] for n in names}, partial / fname)
        weight_map.update({n: fname for n in names})
    if len(shards) > 1:
        total = sum(s.numel() * s.element_size() for s in stored.values())
        write_json(partial / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    _save({n: radix_histogram(s, 0, 0).cpu() for n, s in stored.items()},
          partial / "histograms.safetensors")
    full_info = {"format": "safepatch-scores", "version": 1, **info, "dtype": dtype,
                 "tensors": len(stored), "created": now_iso()}
    write_json(partial / "score_info.json", full_info)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out
