"""Float conversions shared by the Triton kernels, exact on the GPU and in the interpreter.

Triton's CPU interpreter widens bf16 subnormals wrongly and narrows fp32 to bf16 by rounding
half up without carrying into the exponent; these helpers do the bf16 conversions with
integer ops instead (a shift, and four ops on the GPU). fp16 conversions are right in both. References: torch's own
conversions (``Tensor.to``), which the reference ops use.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_f32(x):
    """Exact widening of a loaded fp32 | bf16 | fp16 tensor to fp32."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def score_keys(x):
    """uint32 selection keys of a loaded score tensor (any float dtype): bits of fp32(x), -0 -> 0,
    every NaN -> 0x7FC00000 (one canonical key on every backend; see reference.score_keys)."""
    key = to_f32(x).to(tl.uint32, bitcast=True)
    key = tl.where(key == 0x80000000, tl.zeros_like(key), key)
    is_nan = (key & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, tl.full(key.shape, 0x7FC00000, tl.uint32), key)


@triton.jit
def f32_to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even (NaN -> 0x7FC0, like torch on CPU)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def narrow(acc, OUT_TY: tl.constexpr):
    """fp32 tensor -> OUT_TY (fp32 | bf16 | fp16), round to nearest even."""
    if OUT_TY == tl.bfloat16:
        return f32_to_bf16_rne(acc)
    elif OUT_TY == tl.float16:
        return acc.to(tl.float16)  # round to nearest even, here and on the GPU
    else:
        return acc
