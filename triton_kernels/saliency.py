"""Saliency accumulation in Triton: score += scale * (weight * grad), fp32, in place, one pass.

Reference: ``safepatch_merge.ops.reference.saliency_accumulate_`` (docs/design.md §2, op 1). The
arithmetic is the reference's, rounding by rounding: prod = fp32(w) * fp32(g), then
prod * scale, then score + that, with FMA contraction off, so results are bit-identical.
Memory-bound: 8 bytes of score (read + write) plus the weight and grad bytes per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .floats import to_f32

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _saliency_kernel(score_ptr, w_ptr, g_ptr, n, scale, ROWS: tl.constexpr):
    # [ROWS, 4] tiles: every input gets the same 4-wide vector layout whatever its dtype, so no
    # register shuffles through shared memory between the fp32 and 16-bit loads.
    pid = tl.program_id(0).to(tl.int64)
    i = (pid * ROWS + tl.arange(0, ROWS))[:, None] * 4 + tl.arange(0, 4)[None, :]
    m = i < n
    # Widen right after each load (exactly: floats.to_f32); never compute in bf16.
    w = to_f32(tl.load(w_ptr + i, mask=m, other=0.0))
    g = to_f32(tl.load(g_ptr + i, mask=m, other=0.0))
    s = tl.load(score_ptr + i, mask=m, other=0.0)
    prod = w * g
    tl.store(score_ptr + i, s + prod * scale, mask=m)


def saliency_accumulate_(score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         scale: float = 1.0, block: int = 4096, num_warps: int = 8) -> torch.Tensor:
    """In place: score += float32(scale) * (float32(weight) * float32(grad)); returns score.

    score: float32, contiguous. weight, grad: float32 | bfloat16 | float16 (may differ),
    contiguous, same number of elements and device as score. scale: finite Python float
    (rounded to fp32 like the reference's ``torch.tensor(scale, dtype=float32)``).
    """
    assert score.dtype == torch.float32 and score.is_contiguous()
    assert weight.dtype in _FLOATS and grad.dtype in _FLOATS
    assert weight.is_contiguous() and grad.is_contiguous()
    assert weight.numel() == score.numel() == grad.numel()
    assert weight.device == score.device == grad.device
    assert block >= 4 and block & (block - 1) == 0, "block must be a power of two >= 4"
    n = score.numel()
    if n == 0:
        return score
    grid = (triton.cdiv(n, block),)
    _saliency_kernel[grid](score, weight, grad, n, float(scale), ROWS=block // 4,
                           num_warps=num_warps, enable_fp_fusion=False)
    return score
