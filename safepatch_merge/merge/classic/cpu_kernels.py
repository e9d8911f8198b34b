"""The classic merges' fused C++ loops for CPU tensors: the ``safepatch::abs_delta``,
``abs_delta_histogram`` and ``classic_merge`` ops of the one csrc extension
(csrc/cpu/classic.cpp, built and loaded by :mod:`safepatch_merge.ops._extension`).

The same float32 operations, in the same order, as the eager code in :mod:`.combine`
(compiled with -ffp-contract=off so no multiply-add is fused, -march=native for the machine's
vector width), one pass per chunk instead of ~30; bfloat16/float16 inputs are widened exactly
and the output rounded to nearest even once (csrc/cpu/convert.h, shared with the SafePatching
kernels).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ...ops import _extension

# Per-model term kinds of classic_merge: dropped, kept whole, trimmed at the threshold (|d| >=
# threshold before the term's cutoff index, > threshold from it on), trimmed to |d| > 0,
# randomly dropped by a bool mask.
KIND_NONE, KIND_ALL, KIND_TRIM, KIND_TRIM0, KIND_RANDOM = 0, 1, 2, 3, 4


def _merge(base: torch.Tensor, xs: list[torch.Tensor], kinds: list[int], thresholds: list[float],
           cutoffs: list[int], factors: list[float], weights: list[float],
           masks: list[torch.Tensor], consensus: bool, normalize: bool, lin_div: float, lam: float,
           out_dtype: torch.dtype) -> torch.Tensor:
    """One flat chunk of combine_deltas: base and xs contiguous CPU tensors (float32, bfloat16
    or float16) of one size n; cutoffs[i] in [0, n] the chunk index where a KIND_TRIM term
    stops keeping |d| == threshold (n: never); masks[i] a bool tensor of size n for KIND_RANDOM
    terms (any placeholder otherwise). Returns a flat tensor of out_dtype."""
    return torch.ops.safepatch.classic_merge(base, xs, kinds, thresholds, cutoffs, factors,
                                             weights, masks, consensus, normalize, lin_div, lam,
                                             out_dtype)


_KERNELS = SimpleNamespace(abs_delta=lambda x, base: torch.ops.safepatch.abs_delta(x, base),
                           abs_delta_histogram=lambda x, base, prefix, digit:
                           torch.ops.safepatch.abs_delta_histogram(x, base, prefix, digit),
                           merge=_merge)


def load():
    """The kernels (``abs_delta``, ``abs_delta_histogram``, ``merge``), or None where the
    extension is unavailable (disabled, or its build failed: logged once)."""
    return _KERNELS if _extension.load() else None
