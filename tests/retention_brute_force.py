"""The SafePatching merge of docs/design.md §1 by brute force, for both retention orders: whole
tensors in memory, the retention draw from the reference Philox, thresholds by sorting each
group's (retained) score keys. Shares no code with the engine, select.py or the ops except
the Philox generator itself (ops/philox.py, checked against Random123's known answers).

    T_X = S_X >= t_X and S_X > 0 (and R_X, before selection), t_X = k-th largest key of the
    group (dropped elements as key 0 before selection), k = ceil(a·N), N = scored elements
    M_X by mode; applied_X = R_X ⊙ M_X (after selection) or M_X (before selection); mode none:
    applied_X = R_X
    out = fp32(base) (+ c_SE·d_SE where applied_SE) (+ c_OSM·d_OSM where applied_OSM), rounded
"""
from __future__ import annotations

import fnmatch
import math
import re
from fractions import Fraction

import torch

from merge_helpers import load_dir
from safepatch_merge.ops.philox import retention_words

_BLOCK = re.compile(r"^(model\.layers\.\d+)\.")
PATCH_ID = {"se": 0, "osm": 1}  # Philox counter word 2 of each patch's draw (docs/design.md §1)


def group(name: str, granularity: str) -> str:
    if granularity == "global":
        return "*"
    if granularity == "tensor":
        return name
    m = _BLOCK.match(name)  # the tiny Llama's blocks; anything else is its own group
    return m.group(1) if m else name


def keys_of(t: torch.Tensor) -> torch.Tensor:
    """uint32 keys of fp32(t) as int64, -0 -> 0 (the tests' scores are finite and >= 0)."""
    k = t.float().reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(k == 0x80000000, torch.zeros_like(k), k)


def kept(name: str, numel: int, p: float, seed: int, patch_id: int) -> torch.Tensor:
    if p >= 1.0:
        return torch.ones(numel, dtype=torch.bool)
    return retention_words(numel, 0, seed, name, patch_id) < math.floor(p * 2 ** 32)


def merge(paths: dict, params: dict, patch_format: str = "full", include=None,
          out_dtype=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(merged tensors {name: tensor}, stats {side: {group: {k, n, selected, applied}}})."""
    mode = params.get("mask_mode", "difference")
    gran = params.get("granularity", "global")
    p, seed = params.get("retention", 1.0), params.get("seed", 0)
    before = params.get("retention_order", "after_selection") == "before_selection"
    s = p if params.get("rescale", False) else 1.0
    coeff = {"se": torch.tensor(params.get("alpha", 1.0) / s, dtype=torch.float32),
             "osm": torch.tensor(params.get("beta", 1.0) / s, dtype=torch.float32)}
    base = load_dir(paths["base"])
    sides = [x for x in ("se", "osm") if x in paths]
    patch = {x: load_dir(paths[x]) for x in sides}
    score = {x: load_dir(paths[f"scores_{x}"]) for x in sides} if mode != "none" else {}

    def included(n):
        return include is None or any(fnmatch.fnmatchcase(n, pat) for pat in include)

    names = {x: [n for n in base if included(n) and n in patch[x]
                 and (mode == "none" or n in score[x])] for x in sides}
    r = {x: {n: kept(n, base[n].numel(), p, seed, PATCH_ID[x]) for n in names[x]} for x in sides}
    top, stats = {}, {x: {} for x in sides}
    for x in sides:
        if mode == "none":
            top[x] = {n: torch.ones(base[n].numel(), dtype=torch.bool) for n in names[x]}
            continue
        rate = Fraction(repr(float(params.get(f"top_rate_{x}", 0.1))))
        groups: dict[str, list[str]] = {}
        for n in names[x]:
            groups.setdefault(group(n, gran), []).append(n)
        top[x] = {}
        for g, ns in groups.items():
            keys = {n: keys_of(score[x][n]) for n in ns}
            if before:
                keys = {n: torch.where(r[x][n], k, torch.zeros_like(k)) for n, k in keys.items()}
            allk = torch.cat(list(keys.values()))
            k = math.ceil(rate * allk.numel())
            t = int(torch.sort(allk, descending=True).values[k - 1]) if k else None
            for n in ns:
                top[x][n] = (keys[n] >= t) & (keys[n] > 0) if k else torch.zeros_like(keys[n],
                                                                                    dtype=torch.bool)
            stats[x][g] = {"k": k, "n": allk.numel(),
                           "selected": sum(int(top[x][n].sum()) for n in ns)}
    out = {}
    for n, b in base.items():
        od = out_dtype or b.dtype
        tx = {x: top[x].get(n) for x in sides if n in names[x]}
        if not tx:
            out[n] = b.to(od)
            continue
        none = torch.zeros(b.numel(), dtype=torch.bool)
        t_se, t_osm = tx.get("se", none), tx.get("osm", none)
        if mode == "difference":
            m = {"se": t_se & ~t_osm, "osm": t_osm & ~t_se}
        elif mode == "intersection":
            m = {"se": t_se & t_osm, "osm": t_se & t_osm}
        else:
            m = {"se": t_se, "osm": t_osm}
        acc = b.float().reshape(-1)
        bf = acc.clone()
        for x in ("se", "osm"):
            if x not in tx:
                continue
            applied = m[x] if before and mode != "none" else m[x] & r[x][n]
            d = patch[x][n].float().reshape(-1)
            if patch_format == "full":
                d = d - bf
            acc = torch.where(applied, acc + coeff[x] * d, acc)
            g = stats[x].setdefault(group(n, gran), {"n": 0, "applied": 0}) if mode == "none" \
                else stats[x][group(n, gran)]
            if mode == "none":
                g["n"] += b.numel()
            g["applied"] = g.get("applied", 0) + int(applied.sum())
        out[n] = acc.to(od).reshape(b.shape)
    return out, stats
