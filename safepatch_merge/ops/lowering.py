"""The public op arguments lowered to the integer and fp32 arguments of the kernels' schema.

One place for every compiled backend (the csrc extension and Triton), so they cannot drift:
fp32 thresholds become their uint32 score keys, the retention rate p becomes
keep_threshold = floor(p·2^32), the tensor name its FNV-1a-32 hash, the seed its low 32 bits,
α and β become the fp32 coefficients α/s and β/s (s = p with DARE rescaling, else 1), the
mode and retention order small integers (docs/design.md §1.6–§1.7, §2). The plain-torch
reference takes the public arguments itself. Arguments arrive validated by
``safepatch_merge.ops``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .philox import fnv1a32, keep_threshold
from .reference import MODES, threshold_key

KEEP_ALL = 1 << 32  # keep_threshold of p == 1: nothing drawn
_M32 = 0xFFFFFFFF
MODE_IDS = {m: i for i, m in enumerate(MODES)}  # difference 0, intersection 1, topk 2, none 3


class HistogramArgs(NamedTuple):
    """The scalar arguments of ``safepatch::radix_histogram`` after `scores`, in schema order."""

    prefix: int
    digit: int
    keep_threshold: int
    seed: int
    name_hash: int
    patch_id: int
    offset: int


class MergeArgs(NamedTuple):
    """The arguments of ``safepatch::masked_merge`` after the five tensors and before
    `applied_counts`, in schema order."""

    key_se: int
    key_osm: int
    mode: int
    c_se: float
    c_osm: float
    keep_threshold: int
    seed: int
    name_hash: int
    offset: int
    deltas: bool
    out_dtype: torch.dtype
    return_masks: bool
    retain_first: bool


def histogram_args(prefix: int = 0, digit: int = 0, *, p: float = 1.0, seed: int = 0,
                   name: str = "", patch_id: int = 0, offset: int = 0) -> HistogramArgs:
    """Lower radix_histogram's arguments. p == 1 (the plain histogram) lowers to the schema's
    defaults for the retention arguments, whatever seed, name and offset say."""
    if p >= 1.0:
        return HistogramArgs(int(prefix), int(digit), KEEP_ALL, 0, 0, 0, 0)
    return HistogramArgs(int(prefix), int(digit), keep_threshold(p), seed & _M32, fnv1a32(name),
                         int(patch_id), int(offset))


def merge_args(*, t_se: float, t_osm: float, mode: str, alpha: float, beta: float, p: float,
               rescale: bool, seed: int, name: str, offset: int, patches_are_deltas: bool,
               out_dtype: torch.dtype, return_masks: bool = False,
               retention_order: str = "after_selection") -> MergeArgs:
    """Lower masked_merge's keyword arguments (see ``safepatch_merge.ops.masked_merge``)."""
    s = p if rescale else 1.0
    return MergeArgs(threshold_key(t_se), threshold_key(t_osm), MODE_IDS[mode], alpha / s,
                     beta / s, keep_threshold(p), seed & _M32, fnv1a32(name), int(offset),
                     bool(patches_are_deltas), out_dtype, bool(return_masks),
                     retention_order == "before_selection")


class CompiledOps:
    """The public signatures of ``safepatch_merge.ops.reference`` over one compiled backend's
    custom ops (``torch.ops.safepatch.<prefix>saliency_accumulate_`` and so on): lower the
    arguments here, call the op. `contiguous`: the kernels read scores as a flat buffer."""

    def __init__(self, prefix: str = "", contiguous: bool = False):
        self._prefix, self._contiguous = prefix, contiguous

    def _op(self, name: str):
        return getattr(torch.ops.safepatch, self._prefix + name)

    def saliency_accumulate_(self, score: torch.Tensor, weight: torch.Tensor,
                             grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """In place: score += float32(scale) * (float32(weight) * float32(grad)); returns
        score."""
        self._op("saliency_accumulate_")(score, weight, grad, float(scale))
        return score

    def radix_histogram(self, scores: torch.Tensor, prefix: int = 0, digit: int = 0, *,
                        p: float = 1.0, seed: int = 0, name: str = "", patch_id: int = 0,
                        offset: int = 0) -> torch.Tensor:
        """int64 (65536,) histogram of one 16-bit digit of the score keys (see reference.py);
        p < 1: of the retained scores."""
        if self._contiguous:
            scores = scores.contiguous()
        return self._op("radix_histogram")(
            scores, *histogram_args(prefix, digit, p=p, seed=seed, name=name,
                                    patch_id=patch_id, offset=offset))

    def masked_merge(self, base: torch.Tensor, patch_se: torch.Tensor | None,
                     patch_osm: torch.Tensor | None, score_se: torch.Tensor | None,
                     score_osm: torch.Tensor | None, *, t_se: float, t_osm: float, mode: str,
                     alpha: float, beta: float, p: float, rescale: bool, seed: int, name: str,
                     offset: int, patches_are_deltas: bool, out_dtype: torch.dtype,
                     return_masks: bool = False, retention_order: str = "after_selection",
                     applied_counts: torch.Tensor | None = None):
        """Masked merge of one tensor or chunk in one kernel (see reference.masked_merge for
        the semantics)."""
        args = merge_args(t_se=t_se, t_osm=t_osm, mode=mode, alpha=alpha, beta=beta, p=p,
                          rescale=rescale, seed=seed, name=name, offset=offset,
                          patches_are_deltas=patches_are_deltas, out_dtype=out_dtype,
                          return_masks=return_masks, retention_order=retention_order)
        out, m_se, m_osm = self._op("masked_merge")(base, patch_se, patch_osm, score_se,
                                                    score_osm, *args, applied_counts)
        return (out, m_se, m_osm) if return_masks else out
