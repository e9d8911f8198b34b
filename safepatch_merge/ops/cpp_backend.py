"""The csrc extension (``torch.ops.safepatch``) as a backend: C++ for CPU tensors, CUDA C++
where it was built with CUDA sources. Same functions and signatures as ``reference.py``;
this module only adapts the public arguments to the operator schema (csrc/ops.cpp; docs/design.md §2):
thresholds become uint32 keys, rates and scales become the integers and fp32 coefficients
the kernels use. Arguments arrive validated by ``safepatch_merge.ops``.
"""
from __future__ import annotations

import torch

from . import _extension
from .philox import fnv1a32, keep_threshold
from .reference import MODES, threshold_key

_MODE_IDS = {m: i for i, m in enumerate(MODES)}  # difference 0, intersection 1, topk 2, none 3
_M32 = 0xFFFFFFFF


def available(device: torch.device | str) -> bool:
    """True when the extension is loaded and has kernels for `device`'s type."""
    device = torch.device(device)
    if device.type == "cpu":
        return _extension.load()
    if device.type == "cuda":
        return _extension.has_cuda()
    return False


def saliency_accumulate_(score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
    """In place: score += float32(scale) * (float32(weight) * float32(grad)); returns score."""
    torch.ops.safepatch.saliency_accumulate_(score, weight, grad, float(scale))
    return score


def radix_histogram(scores: torch.Tensor, prefix: int = 0, digit: int = 0, *, p: float = 1.0,
                    seed: int = 0, name: str = "", patch_id: int = 0,
                    offset: int = 0) -> torch.Tensor:
    """int64 (65536,) histogram of one 16-bit digit of the score keys (see reference.py);
    p < 1: of the retained scores."""
    if p >= 1.0:
        return torch.ops.safepatch.radix_histogram(scores, int(prefix), int(digit))
    return torch.ops.safepatch.radix_histogram(scores, int(prefix), int(digit), keep_threshold(p),
                                               seed & _M32, fnv1a32(name), int(patch_id), offset)


def masked_merge(base: torch.Tensor, patch_se: torch.Tensor | None, patch_osm: torch.Tensor | None,
                 score_se: torch.Tensor | None, score_osm: torch.Tensor | None, *,
                 t_se: float, t_osm: float, mode: str, alpha: float, beta: float, p: float,
                 rescale: bool, seed: int, name: str, offset: int, patches_are_deltas: bool,
                 out_dtype: torch.dtype, return_masks: bool = False,
                 retention_order: str = "after_selection",
                 applied_counts: torch.Tensor | None = None):
    """Masked merge of one tensor or chunk (see reference.masked_merge for the semantics)."""
    s = p if rescale else 1.0
    out, m_se, m_osm = torch.ops.safepatch.masked_merge(
        base, patch_se, patch_osm, score_se, score_osm, threshold_key(t_se), threshold_key(t_osm),
        _MODE_IDS[mode], alpha / s, beta / s, keep_threshold(p), seed & _M32, fnv1a32(name),
        offset, bool(patches_are_deltas), out_dtype, bool(return_masks),
        retention_order == "before_selection", applied_counts)
    if return_masks:
        return out, m_se, m_osm
    return out


def philox_words(offset: int, numel: int, seed: int, name: str, patch_id: int) -> torch.Tensor:
    """int64 (numel,) retention words of elements offset.. of tensor `name` (C++; for tests)."""
    if not _extension.load():
        raise RuntimeError(f"the C++ extension is unavailable: {_extension.error()}")
    return torch.ops.safepatch.philox_words(offset, numel, seed & _M32, fnv1a32(name), patch_id)
