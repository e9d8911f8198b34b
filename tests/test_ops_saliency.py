"""saliency_accumulate_ on every backend against the reference and an fp64 computation."""
import math

import pytest
import torch

from op_cases import FLOATS, assert_within_one_ulp, backend, randn  # noqa: F401
from safepatch_merge import ops
from safepatch_merge.ops import reference as ref

SHAPE = (5, 611)  # 3055 elements


@pytest.mark.parametrize("w_dt", FLOATS)
@pytest.mark.parametrize("g_dt", FLOATS)
def test_matches_reference(backend, w_dt, g_dt):
    dev = backend.device
    score0 = randn(SHAPE, torch.float32, 0, 1e-3)
    got, want = score0.clone().to(dev), score0.clone()
    for k, scale in enumerate((0.25, 1.0 / 3.0, 0.4166)):
        w, g = randn(SHAPE, w_dt, 10 + k), randn(SHAPE, g_dt, 20 + k, 1e-2)
        ret = ops.saliency_accumulate_(got, w.to(dev), g.to(dev), scale)
        assert ret is got  # in place
        ref.saliency_accumulate_(want, w, g, scale)
    assert_within_one_ulp(got.cpu(), want, "scores")
    ops.saliency_finalize_(got)
    assert bool((got >= 0).all())


def test_close_to_fp64(backend):
    dev = backend.device
    n_batches = 4
    got = torch.zeros(SHAPE, device=dev)
    exact = torch.zeros(SHAPE, dtype=torch.float64)
    bound = torch.zeros(SHAPE, dtype=torch.float64)
    for k in range(n_batches):
        w, g = randn(SHAPE, torch.bfloat16, 30 + k), randn(SHAPE, torch.float16, 40 + k, 1e-2)
        scale = 1.0 / n_batches
        ops.saliency_accumulate_(got, w.to(dev), g.to(dev), scale)
        term = float(torch.tensor(scale, dtype=torch.float32)) * w.double() * g.double()
        exact += term
        bound += term.abs() + exact.abs()
    ops.saliency_finalize_(got)
    err = (got.cpu().double() - exact.abs()).abs()
    assert bool((err <= 3 * 2.0 ** -24 * bound + 1e-45).all())


def test_odd_sizes_and_empty(backend):
    dev = backend.device
    for n in (0, 1, 17, 1023):
        s = torch.zeros(n, device=dev)
        w, g = randn((n,), torch.float32, n), randn((n,), torch.float32, n + 1)
        ops.saliency_accumulate_(s, w.to(dev), g.to(dev), 2.0)
        assert_within_one_ulp(s.cpu(), 2.0 * (w * g), f"n={n}")


def test_rejects_bad_arguments(backend):
    dev = backend.device
    s, w = torch.zeros(10, device=dev), torch.ones(10, device=dev)
    with pytest.raises(TypeError, match="score has dtype bfloat16; supported: float32"):
        ops.saliency_accumulate_(s.bfloat16(), w, w)
    with pytest.raises(ValueError, match=r"grad has shape \(9,\) but score has \(10,\)"):
        ops.saliency_accumulate_(s, w, w[:9])
    with pytest.raises(TypeError, match="weight has dtype int64"):
        ops.saliency_accumulate_(s, w.long(), w)
    with pytest.raises(ValueError, match="score must be contiguous"):
        ops.saliency_accumulate_(torch.zeros(20, device=dev)[::2], w, w)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.saliency_accumulate_(s, w, w, math.nan)
    with pytest.raises(ValueError, match="weight has unsupported layout"):
        ops.saliency_accumulate_(s, torch.ones(10).to_sparse(), w)
