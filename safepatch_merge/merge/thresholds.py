"""Exact selection thresholds of a score directory, computed streaming in fixed memory.

Digit-0 histograms come from the score directory's ``histograms.safetensors`` (docs/design.md §3)
where it covers a tensor with the right element count, else they are computed by streaming
the scores (and cached in the merge's work directory, never in the input). Each tensor's
histogram is validated (negative, NaN or inf scores: an error naming the tensor), summed per
group, and one streaming refinement pass over the groups' scores finds the exact thresholds
(no pass at all when every score is bfloat16).

Retention before selection (p < 1): thresholds come from histograms of the retained scores
(select.py), which the stored histograms (of all scores) cannot give: the digit-0 histograms
are computed by one more streaming pass over the scores and cached in the work directory under
a name that carries p and seed; the refinement pass histograms retained scores too. Invalid
scores keep their keys in those histograms, so validation still covers every element.
Thresholds cached in ``thresholds.json`` are keyed by rate, granularity, tensors and the
retention (order, p, seed), so a resume never reuses another setting's thresholds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from ..io.atomic import write_atomic
from ..io.checkpoint import HISTOGRAMS_FILE, Checkpoint
from ..io.safetensors_header import read_header
from ..io.writer import OutputError
from ..ops import NUM_BINS, keep_threshold, radix_histogram
from .select import (InvalidScoresError, Retention, Selection, ThresholdPlan, check_histogram,
                      group_of)

if TYPE_CHECKING:  # pragma: no cover
    from .stream import EngineContext


def _read_small(path: Path, start: int, end: int) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise CheckpointError(f"{path}: truncated")
    return torch.frombuffer(bytearray(data), dtype=torch.int64).clone()


def load_histograms(ctx: "EngineContext", role: str, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: int64 (65536,) digit-0 histogram} for `names` of score checkpoint `role`."""
    ck: Checkpoint = ctx.ckpts[role]
    out: dict[str, torch.Tensor] = {}
    hist_path = ck.member(HISTOGRAMS_FILE)  # the link rule applies here too
    if hist_path is not None:
        h = read_header(hist_path)
        for name in names:
            info = h.tensors.get(name)
            if info is None or info.dtype != "I64" or info.shape != (NUM_BINS,):
                continue
            hist = _read_small(hist_path, info.start, info.end)
            if _fits(hist, ck.tensors[name].numel):
                out[name] = hist
    cache = ctx.work_dir / f"hist0_{role}.safetensors" if ctx.work_dir is not None else None
    missing = [n for n in names if n not in out]
    cached = _read_hist_cache(cache) if missing and cache is not None else {}
    for n in missing:
        if n in cached and _fits(cached[n], ck.tensors[n].numel):
            out[n] = cached[n]
    missing = [n for n in names if n not in out]
    if missing:
        out.update(_stream_histograms(ctx, role, missing, cache, Retention(), 0))
    return out


def load_retained_histograms(ctx: "EngineContext", role: str, names: list[str],
                             retention: Retention, patch_id: int) -> dict[str, torch.Tensor]:
    """{name: int64 (65536,) digit-0 histogram of the retained scores} for `names` of score
    checkpoint `role` (patch `patch_id`): from the work directory's cache for this (p, seed),
    else by streaming the scores (the extra pass of retention before selection)."""
    ck: Checkpoint = ctx.ckpts[role]
    cache = (ctx.work_dir / f"hist0_{role}_retained_{keep_threshold(retention.p)}_"
                            f"{retention.seed}.safetensors") if ctx.work_dir is not None else None
    cached = _read_hist_cache(cache) if cache is not None else {}
    out = {n: cached[n] for n in names if n in cached and _fits(cached[n], ck.tensors[n].numel)}
    missing = [n for n in names if n not in out]
    if missing:
        out.update(_stream_histograms(ctx, role, missing, cache, retention, patch_id))
    return out


def _stream_histograms(ctx: "EngineContext", role: str, names: list[str], cache: Path | None,
                       retention: Retention, patch_id: int) -> dict[str, torch.Tensor]:
    """Digit-0 histograms of `names` by streaming them (of the retained scores when
    retention.masks_scores), added to the cache file."""
    acc = {}  # on the engine's device: no host sync per chunk

    def add(name, chunk, offset):
        h = radix_histogram(chunk, 0, 0, **retention.histogram_kwargs(name, patch_id, offset))
        if name in acc:
            acc[name] += h
        else:
            acc[name] = h
        if retention.masks_scores:  # every score is read here: the merge pass may reuse them
            ctx.keep(role, name, offset, chunk)

    what = "retained histograms" if retention.masks_scores else "histograms"
    ctx.stream(role, names, add, desc=f"{what} {role}")
    acc = {n: acc[n].to("cpu") if n in acc else torch.zeros(NUM_BINS, dtype=torch.int64)
           for n in names}
    if cache is not None:
        from safetensors.torch import save

        _write_cache(cache, save({**_read_hist_cache(cache), **acc}), "histogram")
    return acc


def _fits(hist: torch.Tensor, numel: int) -> bool:
    """A digit-0 histogram usable for a tensor of `numel` elements."""
    return hist.dtype == torch.int64 and hist.shape == (NUM_BINS,) \
        and int(hist.sum()) == numel and bool((hist >= 0).all())


def _read_hist_cache(cache: Path) -> dict[str, torch.Tensor]:
    """The work directory's histogram cache; {} if absent or unreadable (it is only a cache:
    a torn or foreign file is recomputed, never trusted)."""
    if not cache.is_file() or cache.is_symlink():
        return {}
    from safetensors.torch import load_file

    try:
        read_header(cache)  # one-line refusal of anything safetensors would choke on
        return load_file(cache)
    except Exception:  # noqa: BLE001 - any unreadable cache counts as absent
        return {}


def _write_cache(path: Path, data: bytes, what: str) -> None:
    """Replace a work-directory cache atomically; a failure (a full disk) is an OutputError."""
    try:
        write_atomic(path, data)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what} cache ({e.strerror or e})") from None


class ThresholdJob:
    """Exact thresholds of one score checkpoint: construct (loads and validates digit-0
    histograms, may stream scores whose histograms are missing), stream :meth:`refinement`'s
    (role, name) tensors through :meth:`add`, then :meth:`result`. Several jobs can share one
    streaming pass (the merge refines SE and OSM scores together)."""

    def __init__(self, ctx: "EngineContext", role: str, names: list[str], rate: float,
                 granularity: str, retention: Retention = Retention(), patch_id: int = 0):
        self.role, self.ckpt = role, ctx.ckpts[role]
        self.retention, self.patch_id = retention, patch_id
        self.cache_file = ctx.work_dir / "thresholds.json" if ctx.work_dir is not None else None
        self.key = json.dumps([role, repr(float(rate)), granularity, names, retention.order,
                               repr(float(retention.p)), retention.seed])
        self.cached = _cached_selection(_read_json_cache(self.cache_file), self.key)
        self.prefix: dict[str, int] = {}
        self.gname: dict[str, str] = {}
        self._refine: dict[str, torch.Tensor] = {}
        if self.cached is not None:
            return
        hist0 = (load_retained_histograms(ctx, role, names, retention, patch_id)
                 if retention.masks_scores else load_histograms(ctx, role, names))
        groups: dict[str, list[str]] = {}
        totals: dict[str, torch.Tensor] = {}
        for name in names:
            try:
                check_histogram(name, hist0[name])
            except InvalidScoresError as e:
                raise CheckpointError(f"{role} {self.ckpt.source}: {e}") from None
            g = group_of(name, granularity)
            groups.setdefault(g, []).append(name)
            totals[g] = totals.get(g, torch.zeros(NUM_BINS, dtype=torch.int64)) + hist0[name]
        bf16 = bool(names) and all(self.ckpt.tensors[n].dtype == "BF16" for n in names)
        # Histograms were validated per tensor above; the plan sees one sum per group.
        self.plan = ThresholdPlan(rate, {g: [g] for g in groups}, totals, low_digit_zero=bf16)
        for g, prefix in self.plan.pending().items():
            for n in groups[g]:
                if int(hist0[n][prefix]):  # tensors without keys in the bin add nothing
                    self.prefix[n], self.gname[n] = prefix, g

    def refinement(self) -> list[tuple[str, str]]:
        """(role, name) of the tensors the refinement pass must stream, in file order."""
        return [(self.role, n) for n in self.ckpt.tensors if n in self.prefix]

    def add(self, name: str, chunk: torch.Tensor, offset: int = 0) -> None:
        # Summed per group on the engine's device, read back once in result(): a host copy
        # per chunk would wait for the GPU every chunk.
        h = radix_histogram(chunk, self.prefix[name], 1,
                            **self.retention.histogram_kwargs(name, self.patch_id, offset))
        g = self.gname[name]
        if g in self._refine:
            self._refine[g] += h
        else:
            self._refine[g] = h

    def result(self) -> dict[str, Selection]:
        if self.cached is not None:
            return {g: Selection(float(v[0]), *v[1:]) for g, v in self.cached.items()}
        for g, h in self._refine.items():
            self.plan.add_refinement(g, h.to("cpu"))
        self._refine = {}
        res = self.plan.result()
        if self.cache_file is not None:
            allc = _read_json_cache(self.cache_file)
            allc[self.key] = {g: [s.threshold, s.k, s.n, s.selected] for g, s in res.items()}
            _write_cache(self.cache_file, json.dumps(allc).encode(), "threshold")
        return res


def _read_json_cache(path: Path | None) -> dict:
    """The threshold cache as a dict; {} if absent or unreadable."""
    if path is None or not path.is_file() or path.is_symlink():
        return {}
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _cached_selection(doc: dict, key: str) -> dict | None:
    """A cached {group: [threshold, k, n, selected]} entry, None if absent or malformed."""
    entry = doc.get(key)
    if not isinstance(entry, dict):
        return None
    for v in entry.values():
        if not (isinstance(v, list) and len(v) == 4 and isinstance(v[0], (int, float))
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v[1:])):
            return None
    return entry


def compute_thresholds_many(ctx: "EngineContext", jobs: dict[str, tuple]
                            ) -> dict[str, dict[str, Selection]]:
    """{key: {group: Selection}} for jobs {key: (role, names, rate, granularity[, retention,
    patch_id])}, with one shared streaming refinement pass. Raises CheckpointError naming the
    tensor for negative, NaN or inf scores."""
    tj = {k: ThresholdJob(ctx, *v) for k, v in jobs.items()}
    by_role = {j.role: j for j in tj.values()}
    entries = [e for j in tj.values() for e in j.refinement()]
    if entries:
        def add(role, name, chunk, off):
            by_role[role].add(name, chunk, off)
            ctx.keep(role, name, off, chunk)  # the merge pass needs these scores again

        ctx.stream_entries(entries, add, desc="thresholds")
    return {k: j.result() for k, j in tj.items()}


def selection_summary(sel: dict[str, Selection], with_shortfall: bool = False) -> dict:
    """JSON-ready {group: {threshold, k, n, selected, density[, shortfall]}} plus overall
    density; with_shortfall: each group's Selection.shortfall too (retention before
    selection)."""
    out = {g: {"threshold": (s.threshold if math.isfinite(s.threshold) else "inf"), "k": s.k,
               "n": s.n, "selected": s.selected, "density": s.density}
           for g, s in sorted(sel.items())}
    if with_shortfall:
        for g, s in sel.items():
            out[g]["shortfall"] = s.shortfall
    n = sum(s.n for s in sel.values())
    return {"groups": out, "selected": sum(s.selected for s in sel.values()), "n": n,
            "density": (sum(s.selected for s in sel.values()) / n) if n else 0.0}
