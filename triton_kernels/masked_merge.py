"""SafePatching's masked merge in Triton: the whole formula of docs/design.md §1.5–§1.7 in one pass.

Reference: ``safepatch_merge.ops.reference.masked_merge``; argument conventions are those of
the op schema (``safepatch::masked_merge``, safepatch_merge/ops/library.py):

    in_X      = key(S_X) >= key_X && key(S_X) > 0      (patch absent -> false; mode none -> true)
    M_X       = by mode (0 difference, 1 intersection, 2 topk, 3 none)
    applied_X = M_X && word_X(offset + i) < keep_threshold      (Philox4x32-10, see philox.py)
    retention before selection (RETAIN_FIRST): in_X &&= word_X < keep_threshold, applied_X = M_X
    acc = fp32(base); if applied_se: acc = acc + c_se * d_se; if applied_osm: acc = acc + c_osm * d_osm
    d_X = fp32(patch_X) (deltas) or fp32(patch_X) - fp32(base);  out = acc rounded (RNE) to out dtype

Every input is read once, with vector loads (patch loads are masked by the tile bounds, not
by the selection, which would split them into scalar loads), arithmetic is fp32 right after
each load (the interpreter mis-computes bf16 arithmetic), scores are compared through their
uint32 keys only, and FMA contraction is off, so values are bit-identical to the reference.
A program handles a [ROWS, 4] tile whose rows are whole Philox counter blocks: one Philox
evaluation per patch per four elements. Widening and narrowing use floats.py (exact in the
interpreter too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .floats import narrow, score_keys, to_f32
from .philox import as_i32, pick_word, retention_block_words

MODE_DIFFERENCE, MODE_INTERSECTION, MODE_TOPK, MODE_NONE = 0, 1, 2, 3
KEEP_ALL = 1 << 32  # keep_threshold meaning p == 1: nothing drawn
INF_KEY = 0x7F800000
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _in_top(s_ptr, i, valid, key_t):
    """S >= t and S > 0 through uint32 keys (key_t: key of t, <= 0x7F800000)."""
    key = score_keys(tl.load(s_ptr + i, mask=valid, other=0.0))
    return (key >= key_t.to(tl.uint32)) & (key > 0)


@triton.jit
def _apply_patch(acc, b, m, valid, p_ptr, i, blk, col, c, keep_i32, seed_i32, hash_i32,
                 PATCH_ID: tl.constexpr, DRAW: tl.constexpr, DELTAS: tl.constexpr):
    """One patch's term: applied = M && kept (Philox word of patch PATCH_ID < keep); returns
    (acc + c*d where applied, applied), d = fp32 delta (patch - base for full patches)."""
    applied = m & valid
    if DRAW:
        w0, w1, w2, w3 = retention_block_words(blk, seed_i32, hash_i32, PATCH_ID)
        applied = applied & (pick_word(w0, w1, w2, w3, col) < keep_i32.to(tl.uint32, bitcast=True))
    d = to_f32(tl.load(p_ptr + i, mask=valid, other=0.0))
    if not DELTAS:
        d = d - b
    return tl.where(applied, acc + c * d, acc), applied


@triton.jit
def _kept(in_x, blk, col, keep_i32, seed_i32, hash_i32, PATCH_ID: tl.constexpr):
    """in_x && (Philox word of patch PATCH_ID < keep): retention before selection."""
    w0, w1, w2, w3 = retention_block_words(blk, seed_i32, hash_i32, PATCH_ID)
    return in_x & (pick_word(w0, w1, w2, w3, col) < keep_i32.to(tl.uint32, bitcast=True))


# Triton turns int arguments equal to 1 into constants; these scalars need to stay tensors.
@triton.jit(do_not_specialize=["key_se", "key_osm", "keep_i32", "seed_i32", "hash_i32"])
def _masked_merge_kernel(base_ptr, pse_ptr, posm_ptr, sse_ptr, sosm_ptr, out_ptr, mse_ptr,
                         mosm_ptr, counts_ptr, n, blk0, key_se, key_osm, c_se, c_osm, keep_i32,
                         seed_i32, hash_i32, HAS_SE: tl.constexpr, HAS_OSM: tl.constexpr,
                         MODE: tl.constexpr, DRAW: tl.constexpr, RETAIN_FIRST: tl.constexpr,
                         DELTAS: tl.constexpr, MASKS: tl.constexpr, COUNT: tl.constexpr,
                         SHIFT: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, ROWS)
    col = tl.arange(0, 4)[None, :]
    # Row r of this tile is counter block blk0 + pid*ROWS + r (absolute element indices
    # 4*block .. 4*block+3); chunk-local index i = absolute - offset, SHIFT = offset & 3.
    i = (pid * ROWS + r)[:, None] * 4 + col - SHIFT
    valid = (i >= 0) & (i < n)
    none = tl.zeros([ROWS, 4], tl.int1)
    blk = blk0 + pid * ROWS + r

    b = to_f32(tl.load(base_ptr + i, mask=valid, other=0.0))
    if HAS_SE:
        if MODE == 3:
            in_se = valid
        else:
            in_se = _in_top(sse_ptr, i, valid, key_se)
    else:
        in_se = none
    if HAS_OSM:
        if MODE == 3:
            in_osm = valid
        else:
            in_osm = _in_top(sosm_ptr, i, valid, key_osm)
    else:
        in_osm = none
    if RETAIN_FIRST:  # T_X = selected and kept; DRAW is then off (no second draw below)
        if HAS_SE:
            in_se = _kept(in_se, blk, col, keep_i32, seed_i32, hash_i32, 0)
        if HAS_OSM:
            in_osm = _kept(in_osm, blk, col, keep_i32, seed_i32, hash_i32, 1)
    if MODE == 0:
        m_se = in_se & (in_osm == 0)
        m_osm = in_osm & (in_se == 0)
    elif MODE == 1:
        m_se = in_se & in_osm
        m_osm = m_se
    else:
        m_se = in_se
        m_osm = in_osm

    acc = b
    if HAS_SE:
        acc, a_se = _apply_patch(acc, b, m_se, valid, pse_ptr, i, blk, col, c_se, keep_i32,
                                 seed_i32, hash_i32, 0, DRAW, DELTAS)
    else:
        a_se = none
    if HAS_OSM:
        acc, a_osm = _apply_patch(acc, b, m_osm, valid, posm_ptr, i, blk, col, c_osm, keep_i32,
                                  seed_i32, hash_i32, 1, DRAW, DELTAS)
    else:
        a_osm = none

    tl.store(out_ptr + i, narrow(acc, out_ptr.dtype.element_ty), mask=valid)
    if MASKS:
        tl.store(mse_ptr + i, a_se.to(tl.uint8), mask=valid)
        tl.store(mosm_ptr + i, a_osm.to(tl.uint8), mask=valid)
    if COUNT:  # one atomic per program and patch
        tl.atomic_add(counts_ptr, tl.sum(tl.sum(a_se.to(tl.int64), axis=1), axis=0), sem="relaxed")
        tl.atomic_add(counts_ptr + 1, tl.sum(tl.sum(a_osm.to(tl.int64), axis=1), axis=0),
                      sem="relaxed")


def masked_merge(base: torch.Tensor, patch_se: torch.Tensor | None, patch_osm: torch.Tensor | None,
                 score_se: torch.Tensor | None, score_osm: torch.Tensor | None, key_se: int,
                 key_osm: int, mode: int, c_se: float, c_osm: float, keep_threshold: int,
                 seed: int, name_hash: int, offset: int, deltas: bool, out_dtype: torch.dtype,
                 return_masks: bool, retain_first: bool = False,
                 applied_counts: torch.Tensor | None = None, rows: int = 256, num_warps: int = 4):
    """Merge one tensor or chunk; arguments as in the schema ``safepatch::masked_merge``.

    base: float32 | bfloat16 | float16, contiguous, any shape. patch_*: same numel/device,
    any of those dtypes, or None (term dropped). score_*: same numel/device, needed unless
    mode == 3 (none) or the patch is None. key_*: uint32 key of the fp32 threshold (0 ..
    0x7F800000; +inf's key selects nothing). mode: 0 difference, 1 intersection, 2 topk,
    3 none. c_*: fp32 coefficients alpha/s and beta/s. keep_threshold: floor(p * 2^32) in
    [0, 2^32] (2^32 keeps all without drawing). seed: int >= 0 (taken mod 2^32). name_hash:
    uint32. offset: int64 >= 0, the chunk's first element inside its tensor (may exceed
    2^32). deltas: patches are deltas (else full patched tensors). retain_first: retention
    before selection (no effect in mode none or with p == 1). applied_counts: int64 (2,) on
    base's device, or None; applied SE / OSM elements are added to it. rows: counter blocks per
    program (power of two; 4*rows elements). Defaults rows=256, num_warps=4: the best of the
    sweeps on an H200 (2^26 bf16 elements, full patches, fp32 scores; bench/results/
    gpu_h200/bars.txt: rows=256/warps=4 96.9 % of copy bandwidth, rows=128/warps=4 96.3 %,
    rows=512/warps=4 88.4 %). One run each: re-measure.

    Returns (out, applied_se, applied_osm): out has base's shape and out_dtype; the masks are
    bool tensors of base's shape when return_masks, else empty bool tensors.
    """
    assert base.dtype in _FLOATS and base.is_contiguous()
    assert mode in (0, 1, 2, 3), mode
    for p, s in ((patch_se, score_se), (patch_osm, score_osm)):
        if p is None:
            continue
        assert p.dtype in _FLOATS and p.is_contiguous()
        assert p.numel() == base.numel() and p.device == base.device
        if mode != MODE_NONE:
            assert s is not None, "score needed unless mode is none"
            assert s.dtype in _FLOATS and s.is_contiguous()
            assert s.numel() == base.numel() and s.device == base.device
    assert 0 <= key_se <= INF_KEY and 0 <= key_osm <= INF_KEY, (key_se, key_osm)
    assert 0 <= keep_threshold <= KEEP_ALL, keep_threshold
    assert seed >= 0 and 0 <= name_hash < 1 << 32 and offset >= 0, (seed, name_hash, offset)
    assert out_dtype in _FLOATS, out_dtype
    assert rows > 0 and rows & (rows - 1) == 0, "rows must be a power of two"
    if applied_counts is not None:
        assert applied_counts.dtype == torch.int64 and applied_counts.numel() == 2
        assert applied_counts.is_contiguous() and applied_counts.device == base.device

    n = base.numel()
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    mshape = base.shape if return_masks else (0,)
    m_se = torch.zeros(mshape, dtype=torch.uint8, device=base.device)
    m_osm = torch.zeros(mshape, dtype=torch.uint8, device=base.device)
    if n > 0:
        draw = keep_threshold < KEEP_ALL
        first = draw and bool(retain_first) and mode != MODE_NONE
        shift = offset & 3
        grid = (triton.cdiv(n + shift, 4 * rows),)
        dummy = base  # stands in for absent tensors; never read (constexpr flags)
        _masked_merge_kernel[grid](
            base, patch_se if patch_se is not None else dummy,
            patch_osm if patch_osm is not None else dummy,
            score_se if score_se is not None else dummy,
            score_osm if score_osm is not None else dummy,
            out, m_se if return_masks else out, m_osm if return_masks else out,
            applied_counts if applied_counts is not None else out,
            n, offset >> 2, key_se, key_osm, float(c_se), float(c_osm),
            as_i32(keep_threshold if draw else 0), as_i32(seed & 0xFFFFFFFF), as_i32(name_hash),
            HAS_SE=patch_se is not None, HAS_OSM=patch_osm is not None, MODE=mode,
            DRAW=draw and not first, RETAIN_FIRST=first, DELTAS=bool(deltas),
            MASKS=bool(return_masks), COUNT=applied_counts is not None, SHIFT=shift, ROWS=rows,
            num_warps=num_warps, enable_fp_fusion=False)
    return out, m_se.view(torch.bool), m_osm.view(torch.bool)
