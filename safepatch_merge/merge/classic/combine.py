"""The elementwise part of the classic merges, for one tensor or one chunk of it.

Given each model's sparsification (kept by magnitude threshold, by Philox draw, all, none)
and its rescale factor — per-tensor facts found beforehand (see :mod:`.tensor_merge`) — every
element is independent, so any chunking gives the same bits. Arithmetic follows mergekit's
GeneralizedTaskArithmeticMerge.merge_group step by step, in float32 whatever the input dtype
(mergekit computes in the config's `dtype`), rounded once to the output dtype:

    d_i   = float32(θ_i) − float32(θ_base)
    s_i   = d_i ⊙ keep_i · factor_i                (factor_i = 1 unless rescale)
    wd_i  = s_i · float32(w_i)
    consensus (TIES sign election, mergekit's "sum" method):
        E      = Σ_i wd_i;  sign = +1 where E >= 0 else −1
        m_i    = sign(wd_i) == sign
        mixed  = Σ_i wd_i ⊙ m_i;  div = Σ_i w_i ⊙ m_i  (0 -> 1)
    no consensus:
        mixed  = Σ_i wd_i;        div = Σ_i w_i          (|div| < 1e-8 -> 1)
    mixed /= div if normalize;  mixed *= λ if λ != 1
    out   = float32(θ_base) + mixed, rounded to the output dtype
"""
from __future__ import annotations

import torch

from ... import ops
from ...ops import cpp_backend
from . import fused
from .terms import KEEP_NONE, KEEP_RANDOM, KEEP_TRIM, Term
from .trim import keep_mask, local_cutoff


def retention_keep(n: int, offset: int, seed: int, name: str, patch_id: int, p: float,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (n,) DARE keep mask of elements offset.. of tensor `name`: the Philox4x32-10
    retention stream of docs/design.md §1.6 (ops.retention_mask), drawn in blocks to bound scratch
    memory, by the C++ kernel where the extension serves this device."""
    thr = ops.keep_threshold(p)
    if thr >= 1 << 32:
        return torch.ones(n, dtype=torch.bool, device=device)
    out = torch.empty(n, dtype=torch.bool, device=device)
    words = _cpp_words(device) if 0 <= patch_id < 1 << 32 else None
    block = _PHILOX_BLOCK if words is not None else _TORCH_PHILOX_BLOCK
    for s in range(0, n, block):
        m = min(block, n - s)
        if words is not None:
            out[s:s + m] = words(offset + s, m, seed, name, patch_id) < thr
        else:
            out[s:s + m] = ops.retention_mask(m, offset + s, seed, name, patch_id, p,
                                              device=device)
    return out


_PHILOX_BLOCK = 1 << 20
_TORCH_PHILOX_BLOCK = 1 << 14  # the plain-torch Philox makes ~20 int64 temporaries per element


def _cpp_words(device):
    if torch.device(device).type != "cpu" or ops.backend_for(device)[0] != "cpp":
        return None
    return cpp_backend.philox_words


def sparsify_(d: torch.Tensor, term: Term, *, seed: int, name: str, offset: int) -> torch.Tensor:
    """In place on a flat float32 delta chunk: d ⊙ keep · factor (mergekit multiplies by the
    0/1 mask, so dropped entries become ±0 exactly as there). offset: the chunk's first
    element within the tensor (the Philox counter). Returns d."""
    if term.keep == KEEP_TRIM:
        ad = d.abs()
        keep = keep_mask(ad, term.threshold, local_cutoff(term.cutoff, offset, d.numel()))
        del ad
        d.mul_(keep)
    elif term.keep == KEEP_RANDOM:
        d.mul_(retention_keep(d.numel(), offset, seed, name, term.patch_id, term.density,
                              device=d.device))
    if term.factor != 1.0:
        d.mul_(torch.tensor(term.factor, dtype=torch.float32))
    return d


def combine_chunk(base: torch.Tensor, xs: list[torch.Tensor], terms: list[Term], *,
                  consensus: bool, normalize: bool, lam: float, out_dtype: torch.dtype,
                  seed: int = 0, name: str = "", offset: int = 0) -> torch.Tensor:
    """Merged values of one chunk. base, xs[i]: same number of elements (any shape; flat
    row-major order is what `offset` counts), float32/bfloat16/float16; returns a tensor of
    base's shape in out_dtype."""
    n = base.numel()
    if fused.enabled(n):
        masks = [retention_keep(n, offset, seed, name, t.patch_id, t.density, device=base.device)
                 if t.keep == KEEP_RANDOM else None for t in terms]
        cuts = [local_cutoff(t.cutoff, offset, n) for t in terms]
        out = fused.merge(base.reshape(-1), [x.reshape(-1) for x in xs], terms,
                          consensus=consensus, normalize=normalize, lam=lam,
                          out_dtype=out_dtype, masks=masks, cuts=cuts)
        if out is not None:
            return out.reshape(base.shape)
    b = base.reshape(-1).to(torch.float32)
    deltas = (None if t.keep == KEEP_NONE else torch.sub(x.reshape(-1), b)  # float32 delta
              for x, t in zip(xs, terms))
    return combine_deltas(b, deltas, terms, consensus=consensus, normalize=normalize, lam=lam,
                          out_dtype=out_dtype, seed=seed, name=name, offset=offset
                          ).reshape(base.shape)


def combine_deltas(b: torch.Tensor, deltas, terms: list[Term], *, consensus: bool,
                   normalize: bool, lam: float, out_dtype: torch.dtype, seed: int = 0,
                   name: str = "", offset: int = 0) -> torch.Tensor:
    """combine_chunk on float32 flat base values `b` and an iterable of float32 flat deltas
    (one per term, None for KEEP_NONE terms), which are consumed and overwritten."""
    wds: list[torch.Tensor] = []
    ws: list[torch.Tensor] = []
    mixed = None
    for d, term in zip(deltas, terms):
        w = torch.tensor(term.weight, dtype=torch.float32)
        ws.append(w)
        if term.keep == KEEP_NONE:
            continue
        wd = sparsify_(d, term, seed=seed, name=name, offset=offset).mul_(w)
        if consensus:
            wds.append(wd)
        else:  # a running sum: one delta alive at a time
            mixed = wd if mixed is None else mixed.add_(wd)
        del d, wd
    if consensus:
        kept = [w for w, t in zip(ws, terms) if t.keep != KEEP_NONE]
        mixed, div = _elect_and_sum(wds, kept, need_div=normalize) if wds else (None, None)
    del wds
    if mixed is not None and normalize:
        if not consensus:
            div = torch.stack(ws).sum()
            if div.abs() < 1e-8:
                div = torch.ones((), dtype=torch.float32)
        mixed.div_(div)
    if mixed is not None and lam != 1:
        mixed.mul_(lam)
    out = b if mixed is None else mixed.add_(b)  # b + mixed == mixed + b in IEEE arithmetic
    return out.to(out_dtype)


def _elect_and_sum(wds: list[torch.Tensor], ws: list[torch.Tensor], need_div: bool):
    """TIES's sign election ("sum" consensus) and disjoint sum of weighted deltas."""
    elected = wds[0].clone()
    for wd in wds[1:]:
        elected.add_(wd)
    positive = elected >= 0
    del elected
    mixed = None
    div = None
    for wd, w in zip(wds, ws):
        agree = torch.where(positive, wd > 0, wd < 0)
        part = wd.mul_(agree)
        mixed = part if mixed is None else mixed.add_(part)
        if need_div:
            wpart = agree.to(torch.float32).mul_(w)
            div = wpart if div is None else div.add_(wpart)
    if need_div:
        div.masked_fill_(div == 0, 1.0)
    return mixed, div
