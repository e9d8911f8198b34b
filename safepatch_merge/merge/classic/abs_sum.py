"""Exact L1 norms of streamed fp32 values, independent of chunking and order.

mergekit's `rescale` (sparsify.rescaled_masked_tensor with the L1 norm) multiplies a
sparsified delta by ||d||_1 / ||d ⊙ mask||_1. A float sum depends on the order of additions, so
a chunked run would differ from a whole-tensor run in the last bit of the factor. Here every
|x| = m · 2^(e−150) (m the 24-bit integer significand, e the biased exponent) is added as an
integer into the bucket of its exponent; integer sums are exact, so the buckets of chunks add
up to the same 256 integers whatever the chunking, and the norm is exact (a Fraction) until it
is rounded once.
"""
from __future__ import annotations

from fractions import Fraction

import torch

_SUB = 1 << 20  # per bincount call: 2^20 x 2^24 < 2^53 (exact in float64); bounds scratch


class ExactAbsSum:
    """Accumulates Σ|x| exactly over float32 chunks (NaN/inf must not occur)."""

    def __init__(self):
        self.parts = torch.zeros(256, dtype=torch.int64)

    def add(self, x: torch.Tensor) -> None:
        """Add Σ|x| of a float32 tensor (any shape)."""
        if x.dtype != torch.float32:
            raise TypeError(f"ExactAbsSum needs float32 values, got {x.dtype}")
        flat = x.reshape(-1)
        for s in range(0, flat.numel(), _SUB):
            bits = flat[s:s + _SUB].contiguous().view(torch.int32) & 0x7FFFFFFF
            e = bits >> 23
            m = (bits & 0x7FFFFF) | ((e > 0).to(torch.int32) << 23)
            self.parts += torch.bincount(e, weights=m.to(torch.float64), minlength=256
                                         ).to(torch.int64)

    def merge(self, other: "ExactAbsSum") -> None:
        self.parts += other.parts

    @property
    def nonfinite(self) -> bool:
        return bool(self.parts[255] != 0)

    def value(self) -> Fraction:
        """The exact sum as a Fraction."""
        if self.nonfinite:
            raise ValueError("NaN or inf values were summed")
        num = 0
        for e, v in enumerate(self.parts.tolist()):
            if v:
                num += v << (max(e, 1) - 1)  # value = v * 2^(max(e,1) - 150) = (v << ...) / 2^149
        return Fraction(num, 1 << 149)


def l1_rescale_factor(before: Fraction, after: Fraction, eps: float = 1e-7) -> float:
    """mergekit's rescale factor ||d||_1 / ||d ⊙ mask||_1, or 1.0 when either norm is below
    eps (mergekit then returns the masked delta unscaled). Returned as the fp32 value."""
    if before < eps or after < eps:
        return 1.0
    return float(torch.tensor(float(before / after), dtype=torch.float32))
