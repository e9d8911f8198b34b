"""The Triton kernels (``safepatch_merge.triton_kernels``) as an ops backend.

Same signatures as :mod:`safepatch_merge.ops.reference`; arguments arrive validated by
``safepatch_merge.ops``. Serves CUDA tensors, and CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``, set before triton is first imported: tests on machines without CUDA).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .philox import fnv1a32, keep_threshold
from .reference import MODES, threshold_key

try:
    from safepatch_merge.triton_kernels import histogram as _hist
    from safepatch_merge.triton_kernels import masked_merge as _merge
    from safepatch_merge.triton_kernels import saliency as _sal
except ImportError:  # triton missing or broken: the backend is unavailable, never an error here
    _hist = _merge = _sal = None


def available(device: torch.device | str) -> bool:
    """True when Triton can run kernels on `device`'s tensors."""
    if _merge is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def saliency_accumulate_(score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
    """In place: score += float32(scale) * (float32(weight) * float32(grad)); returns score."""
    with _on(score.device):
        return _sal.saliency_accumulate_(score, weight, grad, scale)


def radix_histogram(scores: torch.Tensor, prefix: int = 0, digit: int = 0, *, p: float = 1.0,
                    seed: int = 0, name: str = "", patch_id: int = 0,
                    offset: int = 0) -> torch.Tensor:
    """int64 (65536,) histogram of one 16-bit digit of the score keys (see reference.py);
    p < 1: of the retained scores."""
    with _on(scores.device):
        if p >= 1.0:
            return _hist.radix_histogram(scores.contiguous(), prefix, digit)
        return _hist.radix_histogram(scores.contiguous(), prefix, digit,
                                     keep_threshold=keep_threshold(p), seed=seed,
                                     name_hash=fnv1a32(name), patch_id=patch_id, offset=offset)


def masked_merge(base: torch.Tensor, patch_se: torch.Tensor | None, patch_osm: torch.Tensor | None,
                 score_se: torch.Tensor | None, score_osm: torch.Tensor | None, *,
                 t_se: float, t_osm: float, mode: str, alpha: float, beta: float, p: float,
                 rescale: bool, seed: int, name: str, offset: int, patches_are_deltas: bool,
                 out_dtype: torch.dtype, return_masks: bool = False,
                 retention_order: str = "after_selection",
                 applied_counts: torch.Tensor | None = None):
    """Masked merge of one tensor or chunk (see reference.masked_merge); one fused kernel."""
    s = p if rescale else 1.0
    with _on(base.device):
        out, m_se, m_osm = _merge.masked_merge(
            base, patch_se, patch_osm, score_se, score_osm, key_se=threshold_key(t_se),
            key_osm=threshold_key(t_osm), mode=MODES.index(mode), c_se=alpha / s, c_osm=beta / s,
            keep_threshold=keep_threshold(p), seed=seed, name_hash=fnv1a32(name), offset=offset,
            deltas=patches_are_deltas, out_dtype=out_dtype, return_masks=return_masks,
            retain_first=retention_order == "before_selection", applied_counts=applied_counts)
    return (out, m_se, m_osm) if return_masks else out


def _on(device: torch.device):
    """Make `device` current, so kernels launch where their tensors live (cuda:1, ...)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
