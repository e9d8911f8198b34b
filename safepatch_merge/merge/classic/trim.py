"""The classic merges' per-tensor magnitude trim (TIES): exactly mergekit's k entries of
largest |delta|, ties at the threshold taken in element-index order, independent of chunking.

mergekit (sparsify.magnitude) keeps k = max(1, int(density·N)) entries of each tensor with a
top-k whose order among equal |delta| is unspecified. Here the k-th largest |delta| t is found
exactly by the merges' one selector (:class:`..select.KthLargest`, EXACTLY_K: two 16-bit
radix-digit histogram passes), and the kept set is every |delta| > t plus the first k − above
entries with |delta| == t in flat row-major index order. When the tensor has more ties than
that, a :class:`..select.TieCutoff` places the element index where the kept ties stop (from
per-chunk tie counts; usually within the same pass, one more pass when chunks come out of
order); the merge kernels then keep |delta| >= t before the cutoff and |delta| > t from it on.
Zero deltas are never kept (t = 0 happens only when fewer than k deltas are non-zero; a zero
delta adds nothing and its sign, 0, never matches an elected sign), so the kept count is k
whenever at least k deltas are non-zero.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..select import EXACTLY_K, KthLargest, NonFiniteValuesError, TieCutoff

__all__ = ["MagnitudeTrim", "NonFiniteValuesError", "keep_mask", "local_cutoff", "trim_count"]


def trim_count(density: float, n: int) -> int | None:
    """How many entries mergekit's magnitude trim keeps out of n: None for density >= 1 (the
    tensor is returned untouched), 0 for density <= 0 or an empty tensor, else
    max(1, int(density * n)) — binary64 product, truncated, exactly as mergekit computes it."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


class MagnitudeTrim:
    """One model's trim of one tensor of N elements, keeping k: the k-th largest |delta| (two
    histogram passes), then, only when the ties at it overflow k, the tie cutoff (one pass,
    occasionally two). Protocol per pass: :meth:`wants` / :meth:`observe` every chunk,
    :meth:`end_pass`; done when not :attr:`pending`."""

    def __init__(self, k: int):
        self.select = KthLargest(k, EXACTLY_K)
        self.ties: TieCutoff | None = None

    @property
    def pending(self) -> bool:
        return self.select.pending or (self.ties is not None and self.ties.pending)

    @property
    def selecting(self) -> bool:
        """True while the k-th largest is still being searched (histogram passes)."""
        return self.select.pending

    def pass_args(self) -> tuple[int, int]:
        """(prefix, digit) of the histogram the current selection pass needs."""
        return self.select.pass_args()

    def wants(self, offset: int) -> bool:
        """Whether the current pass needs the chunk at `offset`."""
        return self.select.pending or self.ties is None or self.ties.wants(offset)

    def add_histogram(self, hist: torch.Tensor) -> None:
        self.select.add_histogram(hist)

    def observe_ties(self, offset: int, numel: int,
                     abs_delta: Callable[[int, int], torch.Tensor]) -> None:
        """Tie pass on a chunk: abs_delta(s, e) gives float32 |delta| of its elements s..e-1."""
        t = self.threshold
        self.ties.observe(offset, numel, lambda s, e: abs_delta(s, e) == t)

    def end_pass(self) -> None:
        """Close a pass. Raises NonFiniteValuesError for NaN or inf deltas."""
        if self.select.pending:
            self.select.next_stage()
            if not self.select.pending and self.select.ties_overflow:
                self.ties = TieCutoff(self.select.tie_quota, self.select.at)
        elif self.ties is not None:
            self.ties.end_pass()

    @property
    def threshold(self) -> float:
        return self.select.threshold

    @property
    def cutoff(self) -> int | None:
        """Element index from which entries == t are dropped (None: all ties kept)."""
        return self.ties.cutoff if self.ties is not None else None

    @property
    def kept(self) -> int:
        """Entries kept: k, or the non-zero deltas when fewer than k."""
        return self.select.selected


def local_cutoff(cutoff: int | None, offset: int, numel: int) -> int:
    """The tie cutoff relative to the chunk of `numel` elements at `offset`, in [0, numel]:
    the chunk keeps |d| >= t before it and |d| > t from it on."""
    if cutoff is None:
        return numel
    return min(max(cutoff - offset, 0), numel)


def keep_mask(abs_delta: torch.Tensor, threshold: float, cut: int) -> torch.Tensor:
    """Bool mask of the kept entries of a flat chunk: |d| >= t before chunk index `cut`,
    |d| > t from it on, and never |d| = 0 (fp32 compares of non-negative values order exactly
    like their radix keys)."""
    if threshold <= 0:
        return abs_delta > 0
    if cut >= abs_delta.numel():
        return abs_delta >= threshold
    keep = abs_delta > threshold
    if cut > 0:
        keep[:cut] |= abs_delta[:cut] == threshold
    return keep
