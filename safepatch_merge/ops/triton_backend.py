"""The Triton kernels (``safepatch_merge.triton_kernels``) as an ops backend, through the
``safepatch::triton_*`` custom ops (:mod:`.library`).

Same signatures as :mod:`safepatch_merge.ops.reference`; the arguments are lowered to the
schema's by :mod:`.lowering` (shared with the C++ backend) and arrive validated by
``safepatch_merge.ops``. Serves CUDA tensors, and CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``, set before triton is first imported: tests on machines without CUDA).
"""
from __future__ import annotations

import os

import torch

from . import library
from .lowering import histogram_args, merge_args


def available(device: torch.device | str) -> bool:
    """True when Triton can run kernels on `device`'s tensors."""
    if not library.triton_ops():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def saliency_accumulate_(score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
    """In place: score += float32(scale) * (float32(weight) * float32(grad)); returns score."""
    torch.ops.safepatch.triton_saliency_accumulate_(score, weight, grad, float(scale))
    return score


def radix_histogram(scores: torch.Tensor, prefix: int = 0, digit: int = 0, *, p: float = 1.0,
                    seed: int = 0, name: str = "", patch_id: int = 0,
                    offset: int = 0) -> torch.Tensor:
    """int64 (65536,) histogram of one 16-bit digit of the score keys (see reference.py);
    p < 1: of the retained scores."""
    return torch.ops.safepatch.triton_radix_histogram(
        scores.contiguous(), *histogram_args(prefix, digit, p=p, seed=seed, name=name,
                                             patch_id=patch_id, offset=offset))


def masked_merge(base: torch.Tensor, patch_se: torch.Tensor | None, patch_osm: torch.Tensor | None,
                 score_se: torch.Tensor | None, score_osm: torch.Tensor | None, *,
                 t_se: float, t_osm: float, mode: str, alpha: float, beta: float, p: float,
                 rescale: bool, seed: int, name: str, offset: int, patches_are_deltas: bool,
                 out_dtype: torch.dtype, return_masks: bool = False,
                 retention_order: str = "after_selection",
                 applied_counts: torch.Tensor | None = None):
    """Masked merge of one tensor or chunk (see reference.masked_merge); one fused kernel."""
    args = merge_args(t_se=t_se, t_osm=t_osm, mode=mode, alpha=alpha, beta=beta, p=p,
                      rescale=rescale, seed=seed, name=name, offset=offset,
                      patches_are_deltas=patches_are_deltas, out_dtype=out_dtype,
                      return_masks=return_masks, retention_order=retention_order)
    out, m_se, m_osm = torch.ops.safepatch.triton_masked_merge(base, patch_se, patch_osm,
                                                               score_se, score_osm, *args,
                                                               applied_counts)
    return (out, m_se, m_osm) if return_masks else out
