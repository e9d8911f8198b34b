"""Radix histogram of score keys in Triton (docs/design.md §2, op 2): exact int64 counts of one 16-bit
digit of the uint32 keys, 65,536 bins.

Reference: ``safepatch_merge.ops.reference.radix_histogram``. Keys are the bits of
float32(score) with -0 -> 0; digit 0 bins key >> 16 over every element, digit 1 bins
key & 0xFFFF over the elements whose key >> 16 == prefix.

Triton has no shared-memory atomics and ``tl.histogram`` keeps every bin in registers (fine
for a few hundred bins, not for 65,536), so counts go straight to global memory with relaxed
int32 atomics. Hot bins (scores cluster in a few hundred digit-0 bins) would serialise on a
few L2 slices, so the counts are spread over `copies` private histograms (program p adds into
copy p % copies) that are summed into int64 at the end; bin 0 (zero scores, often most of an
embedding) is counted with one block reduction and one atomic per program. Each launch covers at most 2^30
elements, so no int32 counter can overflow. The CUDA twin (csrc/cuda/histogram.cu) keeps
per-block sub-histograms in shared memory instead.

Histogram of retained scores (retention before selection, keep_threshold < 2^32): an element
whose Philox retention word is >= keep_threshold counts as key 0 unless its key is invalid
(>= 0x7F800000); the kernel then works on [ROWS, 4] tiles of whole counter blocks, like the
merge kernel, so one Philox evaluation serves four elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .floats import score_keys
from .philox import as_i32, pick_word, retention_block_words

NUM_BINS = 1 << 16
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_LAUNCH = 1 << 30  # elements per launch: bounds every int32 counter below 2^31
KEEP_ALL = 1 << 32  # keep_threshold meaning p == 1: nothing drawn
_INF_KEY = tl.constexpr(0x7F800000)  # keys >= this are invalid scores (inf, NaN, negative)

__all__ = ["NUM_BINS", "radix_histogram", "default_copies", "score_keys"]


# Triton turns int arguments equal to 1 into constants; `prefix` needs to stay a tensor.
@triton.jit(do_not_specialize=["prefix"])
def _histogram_kernel(x_ptr, hist_ptr, n, prefix, DIGIT: tl.constexpr, COPIES: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    key = score_keys(tl.load(x_ptr + i, mask=m, other=0.0))
    hi = key >> 16
    if DIGIT == 0:
        b = hi
    else:
        b = key & 0xFFFF
        m = m & (hi == prefix.to(tl.uint32))
    # Bin 0 (zero scores: embedding rows never seen, pruned weights) can hold most of a
    # tensor; one atomic per program for it instead of one per element on a single address.
    hist = hist_ptr + (pid % COPIES) * 65536
    zero = m & (b == 0)
    tl.atomic_add(hist, tl.sum(zero.to(tl.int32), axis=0), sem="relaxed")
    tl.atomic_add(hist + b.to(tl.int32), tl.full([BLOCK], 1, tl.int32), mask=m & (b != 0), sem="relaxed")


@triton.jit
def _count(hist_ptr, key, m, prefix, DIGIT: tl.constexpr):
    """Add the keys `key` (where `m`) into one histogram copy: bin 0 with one atomic."""
    hi = key >> 16
    if DIGIT == 0:
        b = hi
    else:
        b = key & 0xFFFF
        m = m & (hi == prefix.to(tl.uint32))
    zero = m & (b == 0)
    tl.atomic_add(hist_ptr, tl.sum(tl.sum(zero.to(tl.int32), axis=1), axis=0), sem="relaxed")
    tl.atomic_add(hist_ptr + b.to(tl.int32), tl.full(b.shape, 1, tl.int32), mask=m & (b != 0),
                  sem="relaxed")


@triton.jit(do_not_specialize=["prefix", "keep_i32", "seed_i32", "hash_i32"])
def _histogram_retained_kernel(x_ptr, hist_ptr, n, blk0, prefix, keep_i32, seed_i32, hash_i32,
                               DIGIT: tl.constexpr, PATCH_ID: tl.constexpr,
                               COPIES: tl.constexpr, SHIFT: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, ROWS)
    col = tl.arange(0, 4)[None, :]
    # Row r is counter block blk0 + pid*ROWS + r; chunk-local index i = absolute - offset.
    i = (pid * ROWS + r)[:, None] * 4 + col - SHIFT
    m = (i >= 0) & (i < n)
    key = score_keys(tl.load(x_ptr + i, mask=m, other=0.0))
    w0, w1, w2, w3 = retention_block_words(blk0 + pid * ROWS + r, seed_i32, hash_i32, PATCH_ID)
    kept = pick_word(w0, w1, w2, w3, col) < keep_i32.to(tl.uint32, bitcast=True)
    key = tl.where(kept | (key >= _INF_KEY), key, tl.zeros_like(key))
    _count(hist_ptr + (pid % COPIES) * 65536, key, m, prefix, DIGIT)


def default_copies(n: int, device: torch.device) -> int:
    """Private histograms for `n` elements: one per 4M elements, 1 .. 32 (1 in the interpreter,
    where atomics do not contend)."""
    if device.type != "cuda":
        return 1
    return max(1, min(32, n >> 22))


def radix_histogram(scores: torch.Tensor, prefix: int = 0, digit: int = 0, block: int = 4096,
                    num_warps: int = 8, copies: int | None = None, *,
                    keep_threshold: int = KEEP_ALL, seed: int = 0, name_hash: int = 0,
                    patch_id: int = 0, offset: int = 0) -> torch.Tensor:
    """int64 tensor (65536,) on scores' device: histogram of one 16-bit digit of the keys.

    scores: float32 | bfloat16 | float16, contiguous, any shape. digit: 0 or 1. prefix: the
    digit-0 bin whose elements digit 1 counts (0 .. 65535; ignored for digit 0). block: elements
    per program (power of two). copies: private int32 histograms (default
    :func:`default_copies`). keep_threshold < 2^32: histogram of the retained scores, with the
    retention words of patch `patch_id` (0 or 1) of the tensor hashed `name_hash` under `seed`,
    elements at absolute indices offset .. (as in ``safepatch::masked_merge``).
    """
    assert scores.dtype in _FLOATS and scores.is_contiguous()
    assert digit in (0, 1) and (digit == 0 or 0 <= prefix < NUM_BINS), (digit, prefix)
    assert block > 0 and block & (block - 1) == 0, "block must be a power of two"
    assert 0 <= keep_threshold <= KEEP_ALL and patch_id in (0, 1), (keep_threshold, patch_id)
    assert seed >= 0 and 0 <= name_hash < 1 << 32 and offset >= 0, (seed, name_hash, offset)
    x = scores.reshape(-1)
    n = x.numel()
    out = torch.zeros(NUM_BINS, dtype=torch.int64, device=scores.device)
    if n == 0:
        return out
    copies = copies or default_copies(n, scores.device)
    hist = torch.empty((copies, NUM_BINS), dtype=torch.int32, device=scores.device)
    for start in range(0, n, _MAX_LAUNCH):
        part = x[start:start + _MAX_LAUNCH]
        hist.zero_()
        if keep_threshold < KEEP_ALL:
            rows = block // 4
            shift = (offset + start) & 3
            grid = (triton.cdiv(part.numel() + shift, block),)
            _histogram_retained_kernel[grid](
                part, hist, part.numel(), (offset + start) >> 2, prefix if digit else 0,
                as_i32(keep_threshold), as_i32(seed & 0xFFFFFFFF), as_i32(name_hash),
                DIGIT=digit, PATCH_ID=patch_id, COPIES=copies, SHIFT=shift, ROWS=rows,
                num_warps=num_warps)
        else:
            grid = (triton.cdiv(part.numel(), block),)
            _histogram_kernel[grid](part, hist, part.numel(), prefix if digit else 0,
                                    DIGIT=digit, COPIES=copies, BLOCK=block,
                                    num_warps=num_warps)
        out += hist.sum(0, dtype=torch.int64)
    return out
