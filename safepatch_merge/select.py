"""Exact top-k thresholds from radix histograms, in fixed memory (docs/design.md §1.4).

T_X = elements with S >= t and S > 0, where t is the exact k-th largest score of a group and
k = ceil(rate * N) computed in integers. The search runs on 16-bit digits of the score keys
(see ops/reference.py): digit-0 histograms (65,536 int64 bins per tensor, kept beside the
scores) locate the bin holding the k-th largest key; one refinement pass of digit-1
histograms over that bin's elements gives the exact key. Memory is two histograms per group,
whatever the number of scores. Histograms of chunks, tensors and shards simply add up.

Streaming use (the merge engine): ``plan = ThresholdPlan(rate, groups, hist0)``; for every
group in ``plan.pending()`` stream the group's tensors and add
``radix_histogram(scores, prefix, digit=1)`` into ``plan.add_refinement(group, hist)``; then
``plan.result()``. In-memory use: :func:`select_thresholds`.

Retention before selection (docs/design.md §1.6.1): the same search over histograms of the *retained*
scores (``radix_histogram(..., p=, seed=, name=, patch_id=, offset=)``: a dropped element
counts as key 0), so N and k stay those of all scored elements and t is the k-th largest
retained score. With fewer than k retained positive scores, t = 0 and every retained positive
element is selected (:attr:`Selection.shortfall` > 0).
"""
from __future__ import annotations

import math
import re
import struct
from fractions import Fraction
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from .ops import NUM_BINS, RETENTION_ORDERS, radix_histogram  # noqa: F401

GRANULARITIES = ("global", "layer", "tensor")
GLOBAL_GROUP = "*"
_FIRST_INVALID_BIN = 0x7F80  # keys >= 0x7F800000 are inf or NaN; >= 0x80000000 are negative
_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)\.")


class InvalidScoresError(ValueError):
    """Scores that are negative, NaN or infinite (message names the tensor)."""


class Selection(NamedTuple):
    """Result for one group: threshold t (fp32 value; +inf selects nothing), k, the group's
    element count n, and how many elements S >= t and S > 0 select (ties make it >= k)."""

    threshold: float
    k: int
    n: int
    selected: int

    @property
    def density(self) -> float:
        return self.selected / self.n if self.n else 0.0

    @property
    def shortfall(self) -> int:
        """k minus the selected elements when fewer than k scores are positive (under retention
        before selection: retained and positive), else 0."""
        return max(0, self.k - self.selected)


class Retention(NamedTuple):
    """The merge's random retention: order (after_selection | before_selection), rate p and
    seed (Philox key word 0). Thresholds depend on it only before selection with p < 1."""

    order: str = "after_selection"
    p: float = 1.0
    seed: int = 0

    @property
    def masks_scores(self) -> bool:
        """True when thresholds come from histograms of the retained scores."""
        return self.order == "before_selection" and self.p < 1.0

    def histogram_kwargs(self, name: str, patch_id: int, offset: int = 0) -> dict:
        """radix_histogram keyword arguments for chunk `offset..` of tensor `name` of patch
        `patch_id` (0 SE, 1 OSM): the retained scores' histogram, or {} for the plain one."""
        if not self.masks_scores:
            return {}
        return dict(p=self.p, seed=self.seed, name=name, patch_id=patch_id, offset=offset)


def top_k_count(rate: float, n: int) -> int:
    """k = ceil(rate * n) in exact rational arithmetic (0.07 * 100 -> 7, not 8)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) \
            or not 0.0 <= rate <= 1.0:
        raise ValueError(f"top rate must be in [0, 1], got {rate!r}")
    return math.ceil(Fraction(repr(float(rate))) * n)


def group_of(name: str, granularity: str) -> str:
    """Group key of tensor `name`: '*' (global), the transformer block prefix such as
    'model.layers.3' (layer; tensors outside blocks form their own group), or the name."""
    if granularity == "global":
        return GLOBAL_GROUP
    if granularity == "tensor":
        return name
    if granularity == "layer":
        m = _LAYER_RE.match(name)
        return m.group(1) if m else name
    raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


def key_to_float(key: int) -> float:
    """The fp32 value whose bit pattern is `key` (0 <= key < 0x7F800000)."""
    return struct.unpack("<f", struct.pack("<I", key))[0]


def check_histogram(name: str, hist0: torch.Tensor) -> int:
    """Validate a digit-0 histogram of tensor `name`; returns its element count.

    Raises InvalidScoresError naming the tensor if any score is negative, NaN or infinite.
    """
    h = hist0.to("cpu", torch.int64)
    if h.shape != (NUM_BINS,):
        raise ValueError(f"histogram of {name!r} has shape {tuple(h.shape)}, expected ({NUM_BINS},)")
    neg = int(h[0x8000:].sum())
    bad = int(h[_FIRST_INVALID_BIN:0x8000].sum())
    if neg or bad:
        what = []
        if neg:
            what.append(f"{neg} negative")
        if bad:
            what.append(f"{bad} NaN/inf")
        raise InvalidScoresError(f"scores of tensor {name!r} contain {' and '.join(what)} "
                                 "values; saliency scores must be finite and >= 0")
    return int(h.sum())


class _Pending(NamedTuple):
    k: int
    n: int
    bin: int
    above: int  # elements whose high digit > bin


class ThresholdPlan:
    """Two-step exact selection for many groups at once (see module docstring).

    rate: top rate in [0, 1]. groups: {group: [tensor names]}. hist0: {name: int64 (65536,)}
    digit-0 histograms (validated here). low_digit_zero: every score is bfloat16 (its fp32 key
    has a zero low digit), so no refinement pass is needed.
    """

    def __init__(self, rate: float, groups: Mapping[str, Iterable[str]],
                 hist0: Mapping[str, torch.Tensor], low_digit_zero: bool = False):
        self.rate = rate
        self._done: dict[str, Selection] = {}
        self._pending: dict[str, _Pending] = {}
        self._refine: dict[str, torch.Tensor] = {}
        self.groups = {g: list(names) for g, names in groups.items()}
        for g, names in self.groups.items():
            total = torch.zeros(NUM_BINS, dtype=torch.int64)
            for name in names:
                check_histogram(name, hist0[name])
                total += hist0[name].to("cpu", torch.int64)
            n = int(total.sum())
            k = top_k_count(rate, n)
            if k == 0:
                self._done[g] = Selection(math.inf, 0, n, 0)
                continue
            # cumulative count of keys with high digit >= b, scanning from the top.
            suffix = torch.flip(torch.cumsum(torch.flip(total, [0]), 0), [0])
            b = int(torch.nonzero(suffix >= k).max())
            above = int(suffix[b] - total[b])
            if low_digit_zero:
                self._finish(g, k, n, b, above, 0, int(total[b]))
            else:
                self._pending[g] = _Pending(k, n, b, above)
                self._refine[g] = torch.zeros(NUM_BINS, dtype=torch.int64)

    def pending(self) -> dict[str, int]:
        """{group: prefix} of the groups still needing a digit-1 pass over their tensors."""
        return {g: p.bin for g, p in self._pending.items()}

    def add_refinement(self, group: str, hist1: torch.Tensor) -> None:
        """Add a digit-1 histogram (prefix = pending()[group]) of one tensor or chunk."""
        self._refine[group] += hist1.to("cpu", torch.int64)

    def _finish(self, g: str, k: int, n: int, b: int, above: int, low: int, at_or_above_low: int):
        key = (b << 16) | low
        selected = above + at_or_above_low
        if key == 0:
            selected = above + at_or_above_low - int(self._zero_count(g, low, at_or_above_low))
        self._done[g] = Selection(key_to_float(key), k, n, selected)

    def _zero_count(self, g: str, low: int, at_or_above_low: int) -> int:
        # key 0 is only reached when b == 0 and low == 0: the zero scores sit in bin 0 of the
        # refinement (or, with low_digit_zero, are the whole bin); they are never selected.
        h = self._refine.get(g)
        return int(h[0]) if h is not None else at_or_above_low

    def result(self) -> dict[str, Selection]:
        """{group: Selection}; every pending group must have had its refinement pass."""
        for g, p in list(self._pending.items()):
            h = self._refine[g]
            kk = p.k - p.above
            suffix = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])
            hits = torch.nonzero(suffix >= kk)
            if kk <= 0 or hits.numel() == 0:
                raise RuntimeError(f"refinement histogram of group {g!r} is incomplete "
                                   f"(needs {kk} elements under prefix {p.bin:#06x})")
            low = int(hits.max())
            self._finish(g, p.k, p.n, p.bin, p.above, low, int(suffix[low]))
            del self._pending[g]
        return dict(self._done)


def select_thresholds(scores: Mapping[str, torch.Tensor], rate: float, granularity: str = "global",
                      hist_fn: Callable[..., torch.Tensor] = radix_histogram,
                      retention: Retention = Retention(), patch_id: int = 0
                      ) -> dict[str, Selection]:
    """Exact thresholds for in-memory score tensors {name: tensor}; returns {group: Selection}.
    retention / patch_id: thresholds of patch `patch_id`'s retained scores when
    ``retention.masks_scores`` (hist_fn then takes radix_histogram's keyword arguments)."""
    groups: dict[str, list[str]] = {}
    for name in scores:
        groups.setdefault(group_of(name, granularity), []).append(name)
    hist0 = {name: hist_fn(t.contiguous(), 0, 0, **retention.histogram_kwargs(name, patch_id))
             for name, t in scores.items()}
    bf16 = all(t.dtype == torch.bfloat16 for t in scores.values())
    plan = ThresholdPlan(rate, groups, hist0, low_digit_zero=bf16)
    for g, prefix in plan.pending().items():
        for name in groups[g]:
            plan.add_refinement(g, hist_fn(scores[name].contiguous(), prefix, 1,
                                           **retention.histogram_kwargs(name, patch_id)))
    return plan.result()
