"""Philox4x32-10 and the retention stream of docs/design.md §1.6, in plain torch (the ground truth).

Every backend draws the retention mask R_X from the same counter-based stream, so a mask never
depends on order, chunking, device or backend:

    key     = (seed mod 2^32, FNV-1a-32(tensor name, UTF-8))
    counter = (low32(i >> 2), high32(i >> 2), patch_id, 0)   # i: int64 element index, row-major
    word    = philox4x32_10(counter, key)[i & 3]
    keep    = word < floor(p * 2^32)                          # p == 1 keeps all, without drawing

Words are held as int64 tensors with values in [0, 2^32): torch has no full uint32 arithmetic,
and 32x32-bit products are split into 16-bit halves so nothing overflows int64.
"""
from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF

PATCH_SE = 0
PATCH_OSM = 1


def fnv1a32(name: str) -> int:
    """FNV-1a 32-bit hash of `name`'s UTF-8 bytes (the second Philox key word)."""
    h = 0x811C9DC5
    for b in name.encode("utf-8"):
        h ^= b
        h = (h * 0x01000193) & _M32
    return h


def keep_threshold(p: float) -> int:
    """floor(p * 2^32) as an exact integer (p * 2^32 is exact in binary64). p in [0, 1]."""
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ValueError(f"retention rate p must be in [0, 1], got {p!r}")
    return int(math.floor(p * 4294967296.0))


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * x, m a uint32 constant, x int64 in [0, 2^32)."""
    mh, ml = m >> 16, m & _M16
    xh, xl = x >> 16, x & _M16
    mid = mh * xl + ml * xh  # < 2^33
    t = ml * xl + ((mid & _M16) << 16)  # < 2^33
    lo = t & _M32
    hi = mh * xh + (mid >> 16) + (t >> 32)
    return hi & _M32, lo


def philox4x32_10(ctr: tuple, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32 with 10 rounds (Salmon et al. 2011; Random123's `philox4x32_R(10, ...)`).

    ctr: four int64 tensors (broadcastable, values in [0, 2^32), on one device) or ints;
    key: two uint32 ints. Returns four int64 tensors with the output words, values in
    [0, 2^32), on the device of the tensor counter words (CPU when all four are ints).
    """
    # Int words go to the tensors' device: a CPU tensor broadcast against CUDA ones would mix
    # devices in the rounds below.
    devices = {c.device for c in ctr if isinstance(c, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"philox4x32_10: counter words on several devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in ctr)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = key[0] & _M32, key[1] & _M32
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & _M32
            k1 = (k1 + PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def retention_words(numel: int, offset: int, seed: int, name: str, patch_id: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32-bit retention words of elements offset .. offset+numel-1 of tensor `name`.

    Returns an int64 tensor of shape (numel,) with values in [0, 2^32).
    """
    if offset < 0 or numel < 0:
        raise ValueError(f"offset and numel must be non-negative, got offset={offset}, numel={numel}")
    if numel == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    # One Philox call per block of four elements, then the words in element order.
    first, last = offset >> 2, (offset + numel - 1) >> 2
    blk = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32_10((blk & _M32, blk >> 32, patch_id, 0), (seed & _M32, fnv1a32(name)))
    w = torch.stack(words, dim=-1).reshape(-1)  # words of elements 4*first .. 4*last+3
    start = offset - 4 * first
    return w[start:start + numel].clone()


def retention_mask(numel: int, offset: int, seed: int, name: str, patch_id: int, p: float,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask (numel,): element kept iff its word < floor(p * 2^32); p == 1 keeps all."""
    thr = keep_threshold(p)
    if thr >= 1 << 32:
        return torch.ones(numel, dtype=torch.bool, device=device)
    return retention_words(numel, offset, seed, name, patch_id, device) < thr
