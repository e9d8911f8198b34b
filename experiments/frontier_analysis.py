"""The frontier study's arithmetic, free of models and files: the prompt split, kept utility,
Pareto fronts and their thinning, hypervolume, a baseline front's over-refusal interpolated at
a given harmful compliance (per prompt too), the paired sign-flip permutation test, and exact
McNemar comparisons of two points' per-prompt flags (one seed or pooled over seeds).

Rates are fractions in [0, 1]; both axes are minimised (harmful compliance, over-refusal).
"""
from __future__ import annotations

import hashlib
import math
import random
from typing import Iterable, Sequence

from safepatch_merge.pipeline.sweep import pareto_front

from paired_tests import mcnemar_exact


def ranked(rows: Sequence[dict], salt: str, key: str = "id") -> list[dict]:
    """`rows` ordered by sha256(salt, row[key]): a fixed pseudo-random order that does not
    depend on the rows' file order, so adding or removing a row moves no other."""
    return sorted(rows, key=lambda r: hashlib.sha256(f"{salt}\x00{r[key]}".encode()).hexdigest())


def split_rows(rows: Sequence[dict], used_ids: Iterable[str], n_val: int, n_test: int,
               salt: str) -> tuple[list[dict], list[dict]]:
    """Validation and test rows of one prompt pool. Validation comes only from rows whose id is
    in `used_ids` (prompts an earlier experiment already reported, so already spent on a
    choice), test only from the others (never evaluated before). Each is a fixed subset
    (`ranked` by `salt`) of at most n_val / n_test rows; the two never share an id."""
    used = set(used_ids)
    val = [r for r in ranked(rows, salt) if r["id"] in used][:n_val]
    test = [r for r in ranked(rows, salt) if r["id"] not in used][:n_test]
    return val, test


def kept_utility(point: dict, backbone: dict, ppl_ratio: float = 1.1,
                 alpaca_margin: float = 0.05) -> bool:
    """The study's kept-utility rule: perplexity <= ppl_ratio x the backbone's and Alpaca
    refusal <= the backbone's + alpaca_margin (absolute, as a fraction). Both dicts carry
    `perplexity` (float) and `alpaca_refusal` (fraction); a missing value fails the rule."""
    p, bp = point.get("perplexity"), backbone.get("perplexity")
    a, ba = point.get("alpaca_refusal"), backbone.get("alpaca_refusal")
    if None in (p, bp, a, ba) or any(isinstance(v, float) and math.isnan(v) for v in (p, a)):
        return False
    return p <= ppl_ratio * bp and a <= ba + alpaca_margin + 1e-12


def front(points: Sequence[dict], x: str = "harm", y: str = "over") -> list[dict]:
    """The Pareto-optimal points (minimising x and y; safepatch_merge's own definition),
    sorted by x ascending then y. Duplicated coordinates are all kept."""
    flags = pareto_front([float(p[x]) for p in points], [float(p[y]) for p in points])
    return sorted((p for p, f in zip(points, flags) if f), key=lambda p: (p[x], p[y]))


def thin(points: Sequence[dict], k: int, x: str = "harm") -> list[dict]:
    """At most k points of a front spread evenly along x: both ends, then the points nearest
    to k-2 evenly spaced x values between them (each point at most once), in x order."""
    pts = sorted(points, key=lambda p: p[x])
    if k <= 0:
        return []
    if len(pts) <= k:
        return list(pts)
    if k == 1:
        return [pts[0]]
    lo, hi = pts[0][x], pts[-1][x]
    chosen = {0, len(pts) - 1}
    for j in range(1, k - 1):
        target = lo + (hi - lo) * j / (k - 1)
        free = [i for i in range(len(pts)) if i not in chosen]
        chosen.add(min(free, key=lambda i: (abs(pts[i][x] - target), i)))
    return [pts[i] for i in sorted(chosen)]


def hypervolume(points: Sequence[dict], ref: tuple[float, float] = (1.0, 1.0),
                x: str = "harm", y: str = "over") -> float:
    """Area dominated by `points` and bounded by the reference point `ref` (both coordinates
    minimised): the union of the boxes [x_i, ref_x] x [y_i, ref_y]. Points not strictly below
    ref in both coordinates add nothing. Empty input gives 0."""
    pts = [(float(p[x]), float(p[y])) for p in points
           if float(p[x]) < ref[0] and float(p[y]) < ref[1]]
    if not pts:
        return 0.0
    pts.sort()
    area, best_y = 0.0, ref[1]
    for i, (px, py) in enumerate(pts):
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        best_y = min(best_y, py)
        area += (nxt - px) * (ref[1] - best_y)
    return area


def bracket(front_pts: Sequence[dict], h: float, x: str = "harm"
            ) -> tuple[int, int, float] | None:
    """Where harmful compliance h falls on a front sorted by x: (i, j, w) with the value at h
    = (1 - w) * value_i + w * value_j, j = i + 1 (or j = i, w = 0 at a point). None when h is
    outside [first x, last x]: no extrapolation."""
    xs = [float(p[x]) for p in front_pts]
    if not xs or h < xs[0] - 1e-12 or h > xs[-1] + 1e-12:
        return None
    for i, xi in enumerate(xs):
        if abs(xi - h) <= 1e-12:
            return i, i, 0.0
    for i in range(len(xs) - 1):
        if xs[i] < h < xs[i + 1]:
            return i, i + 1, (h - xs[i]) / (xs[i + 1] - xs[i])
    return None


def interpolate(front_pts: Sequence[dict], h: float, x: str = "harm", y: str = "over"
                ) -> float | None:
    """The front's y linearly interpolated at x = h (front sorted by x); None outside it."""
    b = bracket(front_pts, h, x)
    if b is None:
        return None
    i, j, w = b
    return (1 - w) * float(front_pts[i][y]) + w * float(front_pts[j][y])


def interpolate_prompts(flags_i: Sequence[bool], flags_j: Sequence[bool], w: float
                        ) -> list[float]:
    """Per-prompt interpolation of two points' binary outcomes on the same prompts (same
    order): (1 - w) * flag_i + w * flag_j, whose mean is the interpolated rate."""
    if len(flags_i) != len(flags_j):
        raise ValueError(f"different prompt counts: {len(flags_i)} vs {len(flags_j)}")
    return [(1 - w) * float(a) + w * float(b) for a, b in zip(flags_i, flags_j)]


def sign_flip_test(diffs: Sequence[float], n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of mean(diffs) = 0: each difference's sign flipped
    at random, n_perm draws from random.Random(seed), p = (1 + #|mean*| >= |mean|) /
    (1 + n_perm). All-zero differences give 1.0."""
    d = [float(v) for v in diffs]
    if not d:
        return float("nan")
    obs = abs(sum(d))
    if obs == 0:
        return 1.0
    rng = random.Random(seed)
    hits = 0
    for _ in range(n_perm):
        s = sum(v if rng.random() < 0.5 else -v for v in d)
        if abs(s) >= obs - 1e-12:
            hits += 1
    return (1 + hits) / (1 + n_perm)


def paired(pairs: Sequence[tuple[dict, dict]]) -> dict:
    """Exact McNemar comparison of binary per-prompt flags, pooled over pairs of flag dicts
    ({prompt id: bool}; one pair per seed, prompts matched within a pair by id). Returns {"n":
    matched (pair, prompt) count, "diff": mean(first) − mean(second) (a fraction), "b": flagged
    only in the first, "c": only in the second, "p": two-sided exact McNemar p}."""
    n = b = c = 0
    for first, second in pairs:
        for k in set(first) & set(second):
            x, y = bool(first[k]), bool(second[k])
            n += 1
            b += x and not y
            c += y and not x
    return {"n": n, "diff": (b - c) / n if n else None, "b": b, "c": c,
            "p": mcnemar_exact(b, c) if n else None}
