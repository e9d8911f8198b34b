"""The fused classic-merge kernels (C++ loops on CPU, built once per machine) give the eager
results bit for bit, and so the independent reference's. Two variants cover the trim / sign
election / disjoint mean path and the drop / rescale / linear / lambda path."""
import pytest
import torch
from classic_reference import reference_merge

from safepatch_merge.merge.classic.in_memory import merge_state_dicts
from safepatch_merge.merge.classic.spec import default_params
from safepatch_merge.merge.classic import cpu_kernels, fused


@pytest.mark.parametrize("method,kw", [
    ("ties", dict(weights=[0.7, 0.4], densities=[0.3, 0.55])),
    ("dare_linear", dict(weights=[0.7, -0.4], densities=[0.3, 0.55], normalize=True, lam=0.8)),
])
def test_compiled_equals_eager_and_reference(method, kw, monkeypatch):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(61, 67, generator=g).bfloat16(),
            "v": torch.randn(1000, generator=g).bfloat16()}
    models = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).bfloat16()
               for k, v in base.items()} for _ in range(2)]
    p = default_params(method, kw["weights"], kw["densities"], normalize=kw.get("normalize"),
                       lam=kw.get("lam", 1.0))
    monkeypatch.setenv("SAFEPATCH_CLASSIC_COMPILE", "0")
    eager = merge_state_dicts(method, base, models, p, seed=3)
    monkeypatch.setenv("SAFEPATCH_CLASSIC_COMPILE", "1")
    comp = merge_state_dicts(method, base, models, p, seed=3)
    chunked = merge_state_dicts(method, base, models, p, seed=3, chunk_elems=999)
    assert cpu_kernels.load() is not None, "the C++ kernels did not build"
    assert not fused._state["failed"]
    for name in base:
        assert torch.equal(comp[name], eager[name]), name
        assert torch.equal(chunked[name], eager[name]), name
        ref = reference_merge(method, name, base[name], [m[name] for m in models],
                              list(p.weights), list(p.densities), normalize=p.normalize,
                              rescale=p.rescale, lam=p.lam, seed=3)
        torch.testing.assert_close(comp[name].float(), ref.float(), rtol=0.0079, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_abs_delta_histogram_equals_histogram_of_abs_delta(dtype):
    """The fused |d| histogram (TIES's trim without storing |d|) counts exactly what
    radix_histogram counts on abs_delta's output: both digits, ties, zeros, NaN, inf, and
    enough elements for several threads and a partial last block."""
    from safepatch_merge import ops

    assert cpu_kernels.load() is not None, "the C++ kernels did not build"
    g = torch.Generator().manual_seed(5)
    n = 3 * 2048 * 17 + 11
    base = torch.randn(n, generator=g).to(dtype)
    x = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
    x[::97] = base[::97]                     # zero deltas
    x[5::101] = (base[5::101].float() + 0.5).to(dtype)  # many equal |d| (ties)
    x[7] = float("nan")
    x[9] = float("inf")
    ad = fused.abs_delta(x, base)
    h0 = ops.radix_histogram(ad, 0, 0)
    assert torch.equal(fused.abs_delta_histogram(x, base, 0, 0), h0)
    assert int(h0[0x7FC0]) == 1 and int(h0[0x7F80]) == 1
    for prefix in [int(b) for b in torch.topk(h0, 3).indices] + [0, 0x7FC0, 12345]:
        assert torch.equal(fused.abs_delta_histogram(x, base, prefix, 1),
                           ops.radix_histogram(ad, prefix, 1)), hex(prefix)
