"""Exact k-th largest selection from radix histograms, in fixed memory (docs/design.md §1.4).

One selector, :class:`KthLargest` (k given, two tie policies), serves both selections of the
merges: SafePatching's thresholds (:class:`ThresholdPlan`, :func:`select_thresholds`:
T_X = elements with S >= t and S > 0, t the exact k-th largest score of a group,
k = ceil(rate * N) in integers, every tie at t kept) and the classic merges' magnitude trim
(merge/classic/trim.py: k per tensor, exactly k kept, ties at t taken in element-index order,
placed by :class:`TieCutoff`).

The search runs on 16-bit digits of the value keys (see ops/reference.py): digit-0 histograms
(65,536 int64 bins, which add up across chunks, tensors and shards) locate the bin holding the
k-th largest key; one refinement pass of digit-1 histograms over that bin's elements gives the
exact key. Memory is two histograms per selection, whatever the number of values.

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

from ..ops import NUM_BINS, RETENTION_ORDERS, radix_histogram  # noqa: F401

GRANULARITIES = ("global", "layer", "tensor")
KEEP_TIES = "keep_ties"    # select every value >= t
EXACTLY_K = "exactly_k"    # select the values > t, then ties at t by element index up to k
TIE_POLICIES = (KEEP_TIES, EXACTLY_K)
TIE_BLOCK = 1 << 20        # elements per block of tie flags (bounds TieCutoff's scratch)
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


class IncompletePassError(RuntimeError):
    """A histogram pass that saw fewer values than the selection needs."""


class NonFiniteValuesError(ValueError):
    """Values with NaN or inf (or negative) keys (the caller names the tensor)."""


class KthLargest:
    """The exact k-th largest t of non-negative fp32 values streamed in chunks, and what a tie
    policy selects (the one selector of SafePatching's thresholds and the classic merges'
    magnitude trim).

    k: 0 <= k <= number of values (k = 0 selects nothing: threshold +inf, no pass).
    ties: KEEP_TIES selects every value >= t (all ties at t); EXACTLY_K selects the values > t
    and the first ``tie_quota`` values == t in element-index order (:class:`TieCutoff` finds
    where they stop). Zero values are never selected, under either policy.
    low_digit_zero: every key's low 16-bit digit is zero (bfloat16 values), so the digit-0
    pass decides and no refinement pass is needed.

    Protocol: while :attr:`pending`: ``prefix, digit = pass_args()``, add the histogram
    ``ops.radix_histogram(chunk, prefix, digit)`` of every chunk (any order, any chunking)
    with :meth:`add_histogram` (or the chunk itself with :meth:`add`), then
    :meth:`next_stage`. Results: threshold, above (values > t), at (values == t), selected,
    tie_quota. Memory: one 65,536-bin int64 histogram.
    """

    def __init__(self, k: int, ties: str = KEEP_TIES, low_digit_zero: bool = False):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        if ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {', '.join(TIE_POLICIES)}, got {ties!r}")
        self.k, self.ties, self.low_digit_zero = k, ties, low_digit_zero
        self.stage = 0 if k else 2
        self._hist = torch.zeros(NUM_BINS, dtype=torch.int64) if k else None
        self._prefix = 0
        self.count: int | None = None  # values seen in the digit-0 pass
        self.key: int | None = None    # fp32 bit pattern of t (None: k = 0)
        self.above = 0
        self.at = 0

    @property
    def pending(self) -> bool:
        """True while another histogram pass over the values is needed."""
        return self.stage < 2

    def pass_args(self) -> tuple[int, int]:
        """(prefix, digit) of the histogram the current pass needs."""
        if self.stage > 1:
            raise RuntimeError("the k-th largest is already found; no more passes")
        return (self._prefix, 1) if self.stage == 1 else (0, 0)

    def add_histogram(self, hist: torch.Tensor) -> None:
        """Add one chunk's int64 (65536,) histogram of the digit :meth:`pass_args` names."""
        if self.stage > 1:
            raise RuntimeError("the k-th largest is already found; no more passes")
        self._hist += hist.to("cpu", torch.int64)

    def add(self, values: torch.Tensor) -> None:
        """Add a chunk of values (float32, contiguous, >= 0)."""
        self.add_histogram(radix_histogram(values, *self.pass_args()))

    def next_stage(self) -> None:
        """Close the current pass. Raises NonFiniteValuesError if a key was negative, NaN or
        inf, ValueError if k exceeds the values seen, IncompletePassError if the refinement
        pass saw fewer values than its bin holds."""
        h = self._hist
        if self.stage == 0:
            if int(h[_FIRST_INVALID_BIN:].sum()):
                raise NonFiniteValuesError("negative, NaN or inf values")
            self.count = int(h.sum())
            if self.k > self.count:
                raise ValueError(f"k={self.k} exceeds the {self.count} values seen")
            b, above = _bin_of_kth(h, self.k)
            self._prefix, self.above = b, above
            if self.low_digit_zero:
                self._finish(b << 16, above, int(h[b]))
                return
            self._hist = torch.zeros(NUM_BINS, dtype=torch.int64)
            self.stage = 1
        elif self.stage == 1:
            low, above_low = _bin_of_kth(h, self.k - self.above)
            self._finish((self._prefix << 16) | low, self.above + above_low, int(h[low]))
        else:
            raise RuntimeError("the k-th largest is already found")

    def _finish(self, key: int, above: int, at: int) -> None:
        self.key, self.above, self.at = key, above, at
        self._hist = None
        self.stage = 2

    def _result(self) -> None:
        if self.stage < 2:
            raise RuntimeError("the k-th largest is not found yet (passes pending)")

    @property
    def threshold(self) -> float:
        """t as an fp32 value (+inf when k = 0)."""
        self._result()
        return math.inf if self.key is None else key_to_float(self.key)

    @property
    def tie_quota(self) -> int:
        """How many values == t the policy selects: all of them (KEEP_TIES), k - above
        (EXACTLY_K); 0 when t = 0 (zeros are never selected) or k = 0."""
        self._result()
        if not self.key:
            return 0
        return self.at if self.ties == KEEP_TIES else self.k - self.above

    @property
    def ties_overflow(self) -> bool:
        """True when only some of the values == t are selected (EXACTLY_K with more ties than
        the quota): then their element indices decide (:class:`TieCutoff`)."""
        return self.tie_quota < self.at if self.key else False

    @property
    def selected(self) -> int:
        """Values the policy selects: above + tie_quota (k under EXACTLY_K unless fewer than
        k values are positive)."""
        self._result()
        return self.above + self.tie_quota


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest key, number of keys in higher bins)."""
    suffix = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])
    hits = torch.nonzero(suffix >= k) if k > 0 else torch.empty(0)
    if hits.numel() == 0:
        raise IncompletePassError(f"the histogram holds fewer than the {k} values needed")
    b = int(hits.max())
    return b, int(suffix[b] - hist[b])


class TieCutoff:
    """Where EXACTLY_K's ties stop in one tensor: the element index ``cutoff`` such that the
    values == t at indices < cutoff are the first ``quota`` of the tensor's ``total`` ties.

    Chunks are fed by :meth:`observe` with a function giving the bool "value == t" flags of a
    span of the chunk. A chunk that continues the chunks seen so far from index 0 is scanned in
    blocks of :data:`TIE_BLOCK` elements and the cutoff is placed as soon as the quota is
    reached (one pass in the usual in-order streaming, and for a whole tensor); chunks that
    come out of order only count their ties, and if the cutoff is not placed by
    :meth:`end_pass`, one more pass (:meth:`wants` names its single chunk) places it. The
    result depends on the tie flags only, never on chunk sizes or order. Memory: one int64
    per out-of-order chunk and one block of flags.
    """

    def __init__(self, quota: int, total: int):
        if not 0 < quota < total:
            raise ValueError(f"a tie cutoff needs 0 < quota < total ties, got {quota}, {total}")
        self.quota, self.total = quota, total
        self.cutoff: int | None = None
        self._next = 0       # chunks seen in order cover [0, _next)
        self._before = 0     # ties in [0, _next)
        self._counts: dict[int, tuple[int, int]] = {}  # out-of-order chunks: offset -> (n, ties)
        self._locate: tuple[int, int] | None = None     # (chunk offset, ties before it)
        self._done = False

    @property
    def pending(self) -> bool:
        """True until the pass that placed the cutoff is closed (:meth:`end_pass`)."""
        return not self._done

    def wants(self, offset: int) -> bool:
        """Whether the current pass needs the chunk starting at `offset`."""
        if self.cutoff is not None:
            return False
        return self._locate is None or self._locate[0] == offset

    def observe(self, offset: int, numel: int,
                flags: Callable[[int, int], torch.Tensor]) -> None:
        """Feed the chunk of `numel` elements at `offset`; flags(s, e) is the bool tensor of
        "value == t" for its elements s..e-1 (chunk-relative)."""
        if self.cutoff is not None:
            return
        if self._locate is not None:
            if offset == self._locate[0]:
                self._scan(offset, numel, flags, self._locate[1])
            return
        if offset != self._next:
            self._counts[offset] = (numel, self._count(numel, flags))
            return
        ties = self._scan(offset, numel, flags, self._before)
        if self.cutoff is None:
            self._next, self._before = offset + numel, self._before + ties

    def _count(self, numel: int, flags) -> int:
        return sum(int(flags(s, min(s + TIE_BLOCK, numel)).sum())
                   for s in range(0, numel, TIE_BLOCK))

    def _scan(self, offset: int, numel: int, flags, before: int) -> int:
        """Ties in the chunk, placing the cutoff if the quota is reached in it."""
        seen = 0
        for s in range(0, numel, TIE_BLOCK):
            f = flags(s, min(s + TIE_BLOCK, numel))
            c = int(f.sum())
            need = self.quota - before - seen
            if c >= need:
                pos = int(torch.nonzero(f.reshape(-1))[need - 1])
                self.cutoff = offset + s + pos + 1
                return seen + c
            seen += c
        return seen

    def end_pass(self) -> None:
        """Close a pass: done if the cutoff is placed, else find the chunk that holds it from
        the tie counts (the next pass then scans that chunk only)."""
        if self.cutoff is not None:
            self._done = True
            return
        if self._locate is not None:
            raise IncompletePassError("the chunk holding the tie cutoff was not fed")
        before, at = self._before, self._next
        spans = sorted(self._counts.items())
        for off, (n, ties) in spans:
            if off < at:
                continue
            if off != at:
                break
            if before + ties >= self.quota:
                self._locate = (off, before)
                self._counts = {}
                return
            before, at = before + ties, at + n
        raise IncompletePassError(f"the chunks fed hold {before} ties before index {at}, "
                                  f"fewer than the {self.quota} needed")


class ThresholdPlan:
    """SafePatching's exact thresholds for many groups at once: one :class:`KthLargest`
    (k = ceil(rate · N), ties kept) per group, fed the group's summed histograms.

    rate: top rate in [0, 1]. groups: {group: [tensor names]}. hist0: {name: int64 (65536,)}
    digit-0 histograms (validated here). low_digit_zero: every score is bfloat16 (its fp32 key
    has a zero low digit), so no refinement pass is needed.
    """

    def __init__(self, rate: float, groups: Mapping[str, Iterable[str]],
                 hist0: Mapping[str, torch.Tensor], low_digit_zero: bool = False):
        self.rate = rate
        self.groups = {g: list(names) for g, names in groups.items()}
        self._sel: dict[str, KthLargest] = {}
        self._n: dict[str, int] = {}
        for g, names in self.groups.items():
            total = torch.zeros(NUM_BINS, dtype=torch.int64)
            for name in names:
                check_histogram(name, hist0[name])
                total += hist0[name].to("cpu", torch.int64)
            n = int(total.sum())
            sel = KthLargest(top_k_count(rate, n), KEEP_TIES, low_digit_zero)
            if sel.pending:
                sel.add_histogram(total)
                sel.next_stage()
            self._sel[g], self._n[g] = sel, n

    def pending(self) -> dict[str, int]:
        """{group: prefix} of the groups still needing a digit-1 pass over their tensors."""
        return {g: s.pass_args()[0] for g, s in self._sel.items() if s.pending}

    def add_refinement(self, group: str, hist1: torch.Tensor) -> None:
        """Add a digit-1 histogram (prefix = pending()[group]) of one tensor or chunk."""
        self._sel[group].add_histogram(hist1)

    def result(self) -> dict[str, Selection]:
        """{group: Selection}; every pending group must have had its refinement pass."""
        for g, s in self._sel.items():
            if s.pending:
                try:
                    s.next_stage()
                except IncompletePassError as e:
                    raise RuntimeError(f"refinement histogram of group {g!r} is incomplete "
                                       f"({e})") from None
        return {g: Selection(s.threshold, s.k, self._n[g], s.selected)
                for g, s in self._sel.items()}


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
