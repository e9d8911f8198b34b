"""Philox4x32-10 retention words in Triton (docs/design.md §1.6).

Reference: ``safepatch_merge/ops/philox.py`` (plain torch, checked against the Random123
known-answer vectors); the C++/CUDA twin is ``csrc/philox.h``.

    key     = (seed mod 2^32, FNV-1a-32(tensor name))
    counter = (low32(i >> 2), high32(i >> 2), patch_id, 0)     i: int64 element index
    word    = philox4x32_10(counter, key)[i & 3]

Kernels work on tiles of shape [R, 4] whose rows are whole counter blocks (four consecutive
element indices with the same i >> 2), so one Philox evaluation serves four elements: the
word of column c is output word c of the row's block.

All words are uint32. Kernel arguments that are uint32 on the host (seed, name hash,
retention threshold) are passed as their int32 bit patterns (:func:`as_i32`) and bit-cast
back inside the kernel, so every value compiles to one specialisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)


def as_i32(v: int) -> int:
    """The int32 with the same 32-bit pattern as the uint32 `v` (0 <= v < 2^32)."""
    assert 0 <= v < 1 << 32, v
    return v - (1 << 32) if v >= 1 << 31 else v


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds. c0..c3: uint32 tensors (same shape); k0, k1: uint32 scalars.
    Returns the four uint32 output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def retention_block_words(blk, seed_i32, name_hash_i32, PATCH_ID: tl.constexpr):
    """The four retention words of counter blocks `blk` (int64 tensor, values >= 0).

    seed_i32 / name_hash_i32: the uint32 key words as int32 bit patterns. PATCH_ID: 0 (SE) or
    1 (OSM). Returns four uint32 tensors shaped like `blk`.
    """
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    c2 = tl.full(blk.shape, PATCH_ID, tl.uint32)
    c3 = tl.zeros(blk.shape, tl.uint32)
    k0 = seed_i32.to(tl.uint32, bitcast=True)
    k1 = name_hash_i32.to(tl.uint32, bitcast=True)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def pick_word(w0, w1, w2, w3, col):
    """[R, 4] words from the per-row words w0..w3 ([R]): column c gets word c (col: [1, 4])."""
    return tl.where(col == 0, w0[:, None],
                    tl.where(col == 1, w1[:, None], tl.where(col == 2, w2[:, None], w3[:, None])))


# Triton turns int arguments equal to 1 into constants; the key words need to stay tensors.
@triton.jit(do_not_specialize=["seed_i32", "name_hash_i32"])
def _retention_words_kernel(out_ptr, n, blk0, seed_i32, name_hash_i32,
                            PATCH_ID: tl.constexpr, SHIFT: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, ROWS)
    col = tl.arange(0, 4)[None, :]
    # Tile rows are the counter blocks blk0 + pid*ROWS + r; element i of the chunk is absolute
    # index offset + i, so column c of row r is i = 4*(pid*ROWS + r) + c - SHIFT.
    i = (pid * ROWS + r)[:, None] * 4 + col - SHIFT
    valid = (i >= 0) & (i < n)
    w0, w1, w2, w3 = retention_block_words(blk0 + pid * ROWS + r, seed_i32, name_hash_i32, PATCH_ID)
    w = pick_word(w0, w1, w2, w3, col)
    tl.store(out_ptr + i, w.to(tl.int64), mask=valid)


def retention_words(numel: int, offset: int, seed: int, name_hash: int, patch_id: int,
                    device: torch.device | str = "cuda", rows: int = 256) -> torch.Tensor:
    """Retention words of elements offset .. offset+numel-1 (int64 tensor, values < 2^32).

    numel, offset: int >= 0 (offset may exceed 2^32). seed: any int >= 0 (taken mod 2^32).
    name_hash: uint32 (FNV-1a-32 of the tensor name). patch_id: 0 or 1. Same values as
    ``safepatch_merge.ops.philox.retention_words(numel, offset, seed, name, patch_id)``.
    """
    assert numel >= 0 and offset >= 0 and seed >= 0, (numel, offset, seed)
    assert 0 <= name_hash < 1 << 32 and patch_id in (0, 1), (name_hash, patch_id)
    assert rows > 0 and rows & (rows - 1) == 0, "rows must be a power of two"
    out = torch.empty(numel, dtype=torch.int64, device=device)
    if numel == 0:
        return out
    shift = offset & 3
    grid = (triton.cdiv(numel + shift, 4 * rows),)
    _retention_words_kernel[grid](out, numel, offset >> 2, as_i32(seed & 0xFFFFFFFF),
                                  as_i32(name_hash), PATCH_ID=patch_id, SHIFT=shift, ROWS=rows)
    return out
