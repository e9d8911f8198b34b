"""TIES's per-tensor magnitude trim, by exact radix selection instead of a sort.

mergekit (sparsify.magnitude) keeps the k = max(1, int(density·N)) entries of largest |delta|
of each tensor, with an argsort. Here the k-th largest |delta| is found exactly from two 16-bit
radix-digit histograms (:func:`safepatch_merge.ops.radix_histogram`, the same op and key
convention as SafePatching's score selection), which add up across chunks; the trim then keeps
|delta| >= t and |delta| > 0. Ties at t are all kept (mergekit keeps an arbitrary subset of
them); zero deltas are never kept, which changes nothing (a zero delta adds nothing and its
sign, 0, never matches an elected sign).
"""
from __future__ import annotations

import math

import torch

from ... import ops
from ...select import key_to_float

_FIRST_NONFINITE_BIN = 0x7F80  # keys >= 0x7F800000: inf or NaN


def trim_count(density: float, n: int) -> int | None:
    """How many entries mergekit's magnitude trim keeps out of n: None for density >= 1 (the
    tensor is returned untouched), 0 for density <= 0 or an empty tensor, else
    max(1, int(density * n)) — binary64 product, truncated, exactly as mergekit computes it."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


class NonFiniteDeltaError(ValueError):
    """A delta with NaN or inf entries (the caller names the tensor and model)."""


class KthLargest:
    """Exact k-th largest of non-negative fp32 values streamed in chunks (1 <= k <= count).

    Protocol: feed every chunk to :meth:`add` while ``stage == 0``, call :meth:`next_stage`;
    if ``stage == 1`` feed every chunk again and call :meth:`next_stage`; then ``stage == 2``
    and :attr:`threshold` holds the value. Chunks may come in any order and size.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.stage = 0
        self._hist = torch.zeros(ops.NUM_BINS, dtype=torch.int64)
        self._prefix = 0
        self._above = 0
        self.threshold: float | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """Add a chunk of values (float32, contiguous, >= 0) to the current stage's histogram."""
        if self.stage == 0:
            self._hist += ops.radix_histogram(values, 0, 0).cpu()
        elif self.stage == 1:
            self._hist += ops.radix_histogram(values, self._prefix, 1).cpu()
        else:
            raise RuntimeError("threshold already found; no more chunks needed")

    def pass_args(self) -> tuple[int, int]:
        """(prefix, digit) of the histogram the current stage needs."""
        if self.stage > 1:
            raise RuntimeError("threshold already found; no more chunks needed")
        return (self._prefix, 1) if self.stage == 1 else (0, 0)

    def add_histogram(self, hist: torch.Tensor) -> None:
        """Add a chunk's histogram of the current stage's digit (see :meth:`pass_args`), for
        callers that histogram the values without materialising them."""
        if self.stage > 1:
            raise RuntimeError("threshold already found; no more chunks needed")
        self._hist += hist.cpu()

    def next_stage(self) -> None:
        """Close the current pass. Raises NonFiniteDeltaError if a value was NaN or inf."""
        h = self._hist
        if self.stage == 0:
            if int(h[_FIRST_NONFINITE_BIN:].sum()):
                raise NonFiniteDeltaError("NaN or inf values")
            self.count = int(h.sum())
            if self.k > self.count:
                raise ValueError(f"k={self.k} exceeds the {self.count} values seen")
            b, above = _bin_of_kth(h, self.k)
            self._prefix, self._above = b, above
            self._hist = torch.zeros(ops.NUM_BINS, dtype=torch.int64)
            self.stage = 1
        elif self.stage == 1:
            low, _ = _bin_of_kth(h, self.k - self._above)
            self.threshold = key_to_float((self._prefix << 16) | low)
            self.stage = 2
        else:
            raise RuntimeError("threshold already found")


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest key, number of keys in higher bins)."""
    suffix = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])
    hits = torch.nonzero(suffix >= k)
    if hits.numel() == 0:
        raise RuntimeError(f"histogram holds fewer than k={k} values (incomplete pass)")
    b = int(hits.max())
    return b, int(suffix[b] - hist[b])


def trim_mask(abs_delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of the kept entries: |delta| >= threshold and |delta| > 0 (fp32 compares of
    non-negative values order exactly like their radix keys)."""
    if math.isinf(threshold):
        return torch.zeros_like(abs_delta, dtype=torch.bool)
    if threshold > 0:  # then |delta| >= t already implies |delta| > 0
        return abs_delta >= threshold
    return abs_delta > 0
