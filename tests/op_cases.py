"""Shared helpers of the op tests: the backend fixture, random inputs, exactness checks.

Every op test takes the ``backend`` fixture and runs once per backend: the plain-torch
reference, the C++ extension (which must build on every machine: unavailable is a failure)
and Triton (under its interpreter on CPU tensors here, compiled on a GPU), plus the C++
extension's CUDA kernels where CUDA exists. Expected values always come from
``safepatch_merge.ops.reference`` on CPU tensors. Sizes stay at a few thousand elements so
the Triton interpreter keeps up.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from conftest import HAS_CUDA
from safepatch_merge import ops
from safepatch_merge.ops import reference as ref

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


class Backend(NamedTuple):
    name: str
    device: torch.device


def _params():
    ps = [pytest.param(("reference", "cpu"), id="reference"),
          pytest.param(("cpp", "cpu"), id="cpp"),
          pytest.param(("triton", "cuda" if HAS_CUDA else "cpu"), id="triton")]
    if HAS_CUDA:
        ps.append(pytest.param(("cpp", "cuda"), id="cpp-cuda"))
    return ps


def require_backend(name: str, device: str) -> None:
    """Fail (cpp on CPU) or skip (anything else truly unavailable) unless `name` serves `device`."""
    dev = torch.device(device)
    if name == "cpp":
        from safepatch_merge.ops import _extension, cpp_backend

        if _extension.disabled():
            pytest.skip("SAFEPATCH_NO_EXT=1 disables the C++ extension")
        if not cpp_backend.available(dev):
            if dev.type == "cpu":
                pytest.fail(f"the C++ extension must build on this machine: {_extension.error()}")
            pytest.skip(f"the C++ extension has no CUDA kernels here ({_extension.error()})")
    elif name == "triton":
        if ops._backend_module("triton", dev) is None:
            pytest.skip("the triton backend is unavailable (triton missing, or no CUDA and "
                        "no TRITON_INTERPRET=1)")


@pytest.fixture(params=_params())
def backend(request) -> Backend:
    """The public ops forced onto one backend for the test (restored afterwards)."""
    name, device = request.param
    require_backend(name, device)
    dev = torch.device(device)
    if dev.type == "cuda":  # results live on cuda:N, and torch.device("cuda") != cuda:0
        dev = torch.device("cuda", torch.cuda.current_device())
    ops.set_backend(name)
    try:
        yield Backend(name, dev)
    finally:
        ops.set_backend(None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen(seed)) * scale).to(dtype)


def rand_scores(shape, dtype, seed, zero_frac=0.1) -> torch.Tensor:
    """Non-negative scores with exact zeros, -0, denormals and many ties."""
    g = gen(seed)
    n = math.prod(shape) if isinstance(shape, tuple) else shape
    s = torch.rand(n, generator=g)
    s = torch.where(torch.rand(n, generator=g) < 0.2, (s * 16).floor() / 16, s)  # ties
    s = torch.where(torch.rand(n, generator=g) < zero_frac, torch.zeros_like(s), s)
    s[torch.rand(n, generator=g) < 0.02] = -0.0
    s[torch.rand(n, generator=g) < 0.02] = 1e-40  # fp32 denormal (0 in bf16/fp16 after rounding)
    return s.reshape(shape).to(dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 spacing of `dtype` at |x| (x any float tensor; subnormals get the minimum spacing)."""
    a = x.to(torch.float64).abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    e = torch.where(a > 0, e, torch.full_like(a, _MIN_EXP[dtype]))
    e = torch.clamp(e, min=_MIN_EXP[dtype])
    return torch.exp2(e - _MANT[dtype])


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between same-dtype float tensors (0 for equal NaN positions)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()

    def ordered(x):
        i = x.view(bits[x.dtype]).to(torch.int64)
        sign = 1 << (8 * x.element_size() - 1)
        return torch.where(i < 0, -(i + sign), i)

    d = (ordered(a) - ordered(b)).abs()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return torch.where(both_nan, torch.zeros_like(d), d)


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor, what: str = "values") -> None:
    """Same dtype, NaN positions equal, every element within one ulp of the expected one."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.cpu(), want.cpu()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN positions differ"
    d = ulp_distance(g, w)
    worst = int(d.max()) if d.numel() else 0
    assert worst <= 1, f"{what}: {int((d > 1).sum())} elements differ by more than 1 ulp (max {worst})"


def to(dev: torch.device, *ts):
    return tuple(None if t is None else t.to(dev) for t in ts)


class MergeCase(NamedTuple):
    base: torch.Tensor
    patch_se: torch.Tensor | None
    patch_osm: torch.Tensor | None
    score_se: torch.Tensor | None
    score_osm: torch.Tensor | None


def merge_case(shape, seed, base_dt=torch.bfloat16, patch_dt=torch.bfloat16,
               score_dt=torch.float32, deltas=True, osm_patch_dt=None) -> MergeCase:
    """Random base, patches (deltas of ~1e-2 or full patched tensors) and scores."""
    base = randn(shape, torch.float32, seed)
    d_se = randn(shape, torch.float32, seed + 1, 0.05)
    d_osm = randn(shape, torch.float32, seed + 2, 0.05)
    if deltas:
        p_se, p_osm = d_se, d_osm
    else:
        p_se, p_osm = base + d_se, base + d_osm
    return MergeCase(base.to(base_dt), p_se.to(patch_dt), p_osm.to(osm_patch_dt or patch_dt),
                     rand_scores(shape, score_dt, seed + 3), rand_scores(shape, score_dt, seed + 4))


def run_merge(backend: Backend, case: MergeCase, **kw):
    """(public op result on the backend's device, reference result on CPU), both as
    MergeMasks-like tuples on CPU. kw: masked_merge keyword arguments."""
    kw = dict(kw, return_masks=True)
    got = ops.masked_merge(*to(backend.device, *case), **kw)
    kw.pop("applied_counts", None)  # counts are the caller's to check
    want = reference_merge(case, **kw)
    return tuple(t.cpu() for t in got), want


def reference_merge(case: MergeCase, *, t_se=math.inf, t_osm=math.inf, mode="difference",
                    alpha=1.0, beta=1.0, p=1.0, rescale=False, seed=0, name="", offset=0,
                    patches_are_deltas=True, out_dtype=None, return_masks=True,
                    retention_order="after_selection"):
    return ref.masked_merge(*case, t_se=t_se, t_osm=t_osm, mode=mode, alpha=alpha, beta=beta,
                            p=p, rescale=rescale, seed=seed, name=name, offset=offset,
                            patches_are_deltas=patches_are_deltas,
                            out_dtype=out_dtype or case.base.dtype, return_masks=return_masks,
                            retention_order=retention_order)
