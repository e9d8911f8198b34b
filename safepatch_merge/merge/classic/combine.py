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

from dataclasses import dataclass

import torch

from ... import ops

KEEP_ALL = "all"
KEEP_NONE = "none"
KEEP_TRIM = "trim"
KEEP_RANDOM = "random"


@dataclass(frozen=True)
class Term:
    """One non-base model's part in a tensor: weight, how its delta is sparsified, the rescale
    factor (fp32 value), and its Philox patch id (its index among the non-base models)."""

    weight: float
    keep: str = KEEP_ALL
    threshold: float = 0.0      # KEEP_TRIM: keep |d| >= threshold and |d| > 0
    density: float = 1.0        # KEEP_RANDOM: keep with probability density
    factor: float = 1.0
    patch_id: int = 0


def sparse_delta(base32: torch.Tensor, x: torch.Tensor, term: Term, *, seed: int, name: str,
                 offset: int) -> torch.Tensor | None:
    """float32 s_i = (θ_i − θ_base) ⊙ keep_i · factor_i of one flat chunk; None if nothing kept.

    base32: float32 (n,); x: (n,) float32/bfloat16/float16; offset: the chunk's first element
    within the tensor (the Philox counter)."""
    if term.keep == KEEP_NONE:
        return None
    d = torch.sub(x, base32)  # promotes to float32: the delta of the exact input values
    if term.keep == KEEP_TRIM:
        ad = d.abs()
        keep = (ad >= term.threshold) if term.threshold > 0 else (ad > 0)
        del ad
        d.mul_(keep)
    elif term.keep == KEEP_RANDOM:
        d.mul_(ops.retention_mask(d.numel(), offset, seed, name, term.patch_id, term.density,
                                  device=d.device))
    if term.factor != 1.0:
        d.mul_(torch.tensor(term.factor, dtype=torch.float32))
    return d


def combine_chunk(base: torch.Tensor, xs: list[torch.Tensor], terms: list[Term], *,
                  consensus: bool, normalize: bool, lam: float, out_dtype: torch.dtype,
                  seed: int = 0, name: str = "", offset: int = 0) -> torch.Tensor:
    """Merged values of one chunk. base, xs[i]: same number of elements (any shape; flat
    row-major order is what `offset` counts); returns a tensor of base's shape in out_dtype."""
    shape = base.shape
    b = base.reshape(-1).to(torch.float32)
    wds: list[torch.Tensor] = []
    ws: list[torch.Tensor] = []
    for x, term in zip(xs, terms):
        w = torch.tensor(term.weight, dtype=torch.float32)
        s = sparse_delta(b, x.reshape(-1), term, seed=seed, name=name, offset=offset)
        if s is None:
            if not consensus:  # its weight still counts in the linear divisor
                ws.append(w)
            continue
        wds.append(s.mul_(w))
        ws.append(w)

    if not wds:
        mixed = None
    elif consensus:
        mixed, div = _elect_and_sum(wds, ws, need_div=normalize)
    else:
        mixed = wds[0]
        for wd in wds[1:]:
            mixed.add_(wd)
    if mixed is not None and normalize:
        if not consensus:
            div = torch.stack(ws).sum()
            if div.abs() < 1e-8:
                div = torch.ones((), dtype=torch.float32)
        mixed.div_(div)
    if mixed is not None and lam != 1:
        mixed.mul_(lam)
    out = b if mixed is None else mixed.add_(b)  # b + mixed == mixed + b in IEEE arithmetic
    return out.to(out_dtype).reshape(shape)


def _elect_and_sum(wds: list[torch.Tensor], ws: list[torch.Tensor], need_div: bool):
    """TIES's sign election ("sum" consensus) and disjoint sum of weighted deltas."""
    elected = wds[0].clone()
    for wd in wds[1:]:
        elected.add_(wd)
    positive = elected.ge_(0).to(torch.bool)
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
