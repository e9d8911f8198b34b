"""The ops as torch.library custom ops: torch.library.opcheck on every op (schema, fake
implementation, autograd registration, AOT dispatch with dynamic shapes) on CPU tensors, one
schema for every implementation, and torch.compile(fullgraph=True) equal to eager bit for bit.
"""
import math
import os

import pytest
import torch

from conftest import requires_cuda
from op_cases import merge_case, rand_scores, randn, require_backend
from safepatch_merge import ops
from safepatch_merge.ops import library
from safepatch_merge.ops.lowering import histogram_args, merge_args

N = 1001  # odd: not a multiple of any block


def _merge_samples():
    """(args, kwargs) samples of safepatch::masked_merge: both patches with retention, scores
    and counts; full patched tensors, masks off; a missing patch, mode none."""
    case = merge_case((7, 143), 5, torch.bfloat16, torch.bfloat16, torch.float32)
    lowered = merge_args(t_se=0.5, t_osm=0.6, mode="difference", alpha=1.25, beta=0.75, p=0.6,
                         rescale=True, seed=7, name="w", offset=3, patches_are_deltas=True,
                         out_dtype=torch.bfloat16, return_masks=True)
    full = merge_args(t_se=0.5, t_osm=0.6, mode="intersection", alpha=1.0, beta=1.0, p=1.0,
                      rescale=False, seed=0, name="", offset=0, patches_are_deltas=False,
                      out_dtype=torch.float32, return_masks=False,
                      retention_order="before_selection")
    none = merge_args(t_se=math.inf, t_osm=math.inf, mode="none", alpha=1.0, beta=1.0, p=0.5,
                      rescale=False, seed=1, name="x", offset=0, patches_are_deltas=True,
                      out_dtype=torch.float16, return_masks=True)
    base = case.base.clone().requires_grad_(True)  # the autograd registration check needs one
    return [
        ((base, *case[1:], *lowered, torch.zeros(2, dtype=torch.int64)), {}),
        ((case.base, *case[1:], *full), {}),
        ((case.base, case.patch_se, None, None, None, *none), {}),
    ]


def _histogram_samples():
    s = rand_scores(N, torch.float32, 1)
    prefix = int(torch.argmax(ops.reference.radix_histogram(s, 0, 0)))
    return [((s, *histogram_args(0, 0)), {}),
            ((s.to(torch.bfloat16), *histogram_args(prefix, 1)), {}),
            ((s, *histogram_args(0, 0, p=0.4, seed=3, name="layer", patch_id=1, offset=5)), {})]


def _saliency_samples():
    score = randn(N, torch.float32, 2)
    weight = randn(N, torch.bfloat16, 3).requires_grad_(True)
    return [((score, weight, randn(N, torch.float16, 4), 0.25), {}),
            ((score.clone(), randn(N, torch.float32, 5), randn(N, torch.bfloat16, 6), -1.5), {})]


def _classic_inputs():
    n = 2 * 2048 + 11  # two whole blocks of the C++ loops and a partial one
    base = randn(n, torch.bfloat16, 7)
    xs = [(base.float() + randn(n, torch.float32, 8 + i, 0.05)).to(dt)
          for i, dt in enumerate((torch.bfloat16, torch.float16, torch.float32))]
    xs[0][::13] = base[::13]  # zero deltas
    return base, xs


def _abs_delta_samples():
    base, xs = _classic_inputs()
    return [((xs[0], base.clone().requires_grad_(True)), {}), ((xs[2], base), {})]


def _abs_delta_histogram_samples():
    base, xs = _classic_inputs()
    h = torch.ops.safepatch.abs_delta_histogram(xs[0], base, 0, 0)
    return [((xs[0], base, 0, 0), {}), ((xs[1], base, int(torch.argmax(h)), 1), {})]


def _classic_merge_samples():
    from safepatch_merge.merge.classic.cpu_kernels import (KIND_ALL, KIND_NONE, KIND_RANDOM,
                                                           KIND_TRIM)

    base, xs = _classic_inputs()
    keep = torch.rand(base.numel(), generator=torch.Generator().manual_seed(3)) < 0.4
    one = torch.ones((), dtype=torch.bool)  # the mask placeholder of non-random terms
    n = base.numel()
    ties = (base.clone().requires_grad_(True), xs, [KIND_TRIM, KIND_TRIM, KIND_NONE],
            [0.03, 0.02, 0.0], [n, n // 2, n], [1.0, 1.0, 1.0], [0.7, 0.4, 1.0],
            [one, one, one], True, True, 1.0, 1.0, torch.bfloat16)
    dare = (base, xs, [KIND_RANDOM, KIND_ALL, KIND_NONE], [0.0, 0.0, 0.0], [n, n, n],
            [2.5, 1.0, 1.0], [0.7, -0.4, 1.0], [keep, one, one], False, True, 0.3, 0.8,
            torch.float32)
    return [(ties, {}), (dare, {})]


SAMPLES = {"saliency_accumulate_": _saliency_samples, "radix_histogram": _histogram_samples,
           "masked_merge": _merge_samples, "abs_delta": _abs_delta_samples,
           "abs_delta_histogram": _abs_delta_histogram_samples,
           "classic_merge": _classic_merge_samples}


def _on(device, args):
    """The sample's tensors (also inside lists) on `device`, requires_grad kept."""
    def move(a):
        if isinstance(a, list):
            return [move(x) for x in a]
        if isinstance(a, torch.Tensor):
            return a.detach().to(device).requires_grad_(a.requires_grad)
        return a
    return tuple(move(a) for a in args)


def _opcheck(qual: str, op: str, device: str) -> None:
    for args, kwargs in SAMPLES[op]():
        torch.library.opcheck(getattr(torch.ops.safepatch, qual).default, _on(device, args),
                              kwargs)


@pytest.mark.parametrize("op", library.OPS)
def test_opcheck_cpp(op):
    require_backend("cpp", "cpu")
    _opcheck(op, op, "cpu")


@pytest.mark.parametrize("op", library.OPS)
def test_opcheck_triton(op):
    require_backend("triton", "cpu")
    _opcheck(f"triton_{op}", op, "cpu")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
@pytest.mark.parametrize("op", library.OPS)
def test_opcheck_cuda(op, backend_name):
    """The CUDA C++ and compiled Triton kernels under opcheck (bench/gpu_check.sh runs it)."""
    require_backend(backend_name, "cuda")
    _opcheck(op if backend_name == "cpp" else f"triton_{op}", op, "cuda")


@pytest.mark.parametrize("op", library.CLASSIC_OPS)
def test_opcheck_classic(op):
    """The classic merges' CPU loops (bit-for-bit checks against eager torch:
    tests/test_classic_fused.py)."""
    require_backend("cpp", "cpu")
    _opcheck(op, op, "cpu")


def test_opcheck_philox_words():
    require_backend("cpp", "cpu")
    torch.library.opcheck(torch.ops.safepatch.philox_words.default, (5, 37, 11, 1234, 1))


def test_one_schema_per_op():
    """The C++ and Triton ops share the schema written once in library.SCHEMAS."""
    assert library.triton_ops(), "triton should import here (the dev extra installs it)"
    for op in library.OPS:
        for qual in (op, f"triton_{op}"):
            schema = getattr(torch.ops.safepatch, qual).default._schema
            got = str(schema).split("(", 1)[1]
            want = str(torch._C.parse_schema(f"safepatch::{qual}{library.SCHEMAS[op]}"))
            assert got == want.split("(", 1)[1], qual


def _compiled(fn, seen: list):
    """fn under torch.compile(fullgraph=True) with Inductor; `seen` gets the graph's targets."""
    torch._dynamo.reset()
    inductor = torch._dynamo.lookup_backend("inductor")

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return inductor(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=backend)


def test_compiled_masked_merge_equals_eager():
    """ops.masked_merge inside torch.compile(fullgraph=True): one graph, the same bits."""
    require_backend("cpp", "cpu")
    case = merge_case((13, 77), 9, torch.bfloat16, torch.float32, torch.float32)

    def merge(base, p_se, p_osm, s_se, s_osm, counts):
        r = ops.masked_merge(base, p_se, p_osm, s_se, s_osm, t_se=0.4, t_osm=0.55,
                             mode="difference", alpha=1.25, beta=-0.5, p=0.7, rescale=True,
                             seed=2026, name="model.layers.0.mlp.up_proj.weight", offset=9,
                             return_masks=True, applied_counts=counts)
        return r.out * 2, r.applied_se, r.applied_osm

    counts_e, counts_c = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    want = merge(*case, counts_e)
    seen = []
    got = _compiled(merge, seen)(*case, counts_c)
    assert "safepatch.masked_merge" in seen, seen  # the C++ op, not the reference retraced
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert torch.equal(counts_c, counts_e) and 0 < int(counts_e[0]) < case.base.numel()
    assert torch.equal(want[1], ops.reference.masked_merge(
        *case, t_se=0.4, t_osm=0.55, mode="difference", alpha=1.25, beta=-0.5, p=0.7,
        rescale=True, seed=2026, name="model.layers.0.mlp.up_proj.weight", offset=9,
        patches_are_deltas=True, out_dtype=torch.bfloat16, return_masks=True)[1])


def test_compiled_radix_histogram_equals_eager():
    require_backend("cpp", "cpu")
    s = rand_scores(N, torch.float32, 13)

    def hist(scores):
        h0 = ops.radix_histogram(scores)
        h1 = ops.radix_histogram(scores, p=0.5, seed=4, name="w", patch_id=1, offset=2)
        return h0 + 1, h1

    want = hist(s)
    seen = []
    got = _compiled(hist, seen)(s)
    assert seen.count("safepatch.radix_histogram") == 2, seen
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(want[0] - 1, ops.reference.radix_histogram(s))
    assert int(want[1].sum()) == N and not torch.equal(want[1], want[0] - 1)


def test_build_command(capsys, monkeypatch):
    """python -m safepatch_merge.ops.build: the extension ready, its library named; refused
    (exit 1, one line) when SAFEPATCH_NO_EXT=1."""
    from pathlib import Path

    from safepatch_merge.ops import build

    require_backend("cpp", "cpu")
    assert build.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("safepatch extension ready (")
    assert Path(out.rsplit(": ", 1)[1].strip()).is_file()
    monkeypatch.setenv("SAFEPATCH_NO_EXT", "1")
    assert build.main() == 1
    assert capsys.readouterr().err.strip() == "error: SAFEPATCH_NO_EXT=1 disables the extension"


def test_lowering():
    """The one lowering of the public arguments: keys, keep threshold, FNV-1a, seed, α/s."""
    from safepatch_merge.ops.lowering import KEEP_ALL, HistogramArgs, MergeArgs

    a = merge_args(t_se=0.5, t_osm=math.inf, mode="topk", alpha=1.5, beta=-0.25, p=0.25,
                   rescale=True, seed=(7 << 32) + 9, name="a", offset=1 << 40,
                   patches_are_deltas=False, out_dtype=torch.float16, return_masks=True,
                   retention_order="before_selection")
    assert a == MergeArgs(0x3F000000, 0x7F800000, 2, 6.0, -1.0, 1 << 30, 9, 0xE40C292C, 1 << 40,
                          False, torch.float16, True, True)
    assert merge_args(t_se=-0.0, t_osm=1e39, mode="none", alpha=1.0, beta=1.0, p=1.0,
                      rescale=True, seed=0, name="", offset=0, patches_are_deltas=True,
                      out_dtype=torch.bfloat16)[:6] == (0, 0x7F800000, 3, 1.0, 1.0, KEEP_ALL)
    # p == 1: the plain histogram, whatever the draw arguments say
    assert histogram_args(3, 1, p=1.0, seed=5, name="x", patch_id=1, offset=7) == \
        HistogramArgs(3, 1, KEEP_ALL, 0, 0, 0, 0)
    assert histogram_args(0, 0, p=0.5, seed=(1 << 32) + 2, name="a", patch_id=1, offset=7) == \
        HistogramArgs(0, 0, 1 << 31, 2, 0xE40C292C, 1, 7)


def test_compiled_triton_masked_merge_equals_eager():
    """The Triton op traces too (its fake implementation): the same bits compiled and eager."""
    require_backend("triton", "cpu")
    case = merge_case((5, 67), 4, torch.float16, torch.bfloat16, torch.bfloat16)
    kw = dict(t_se=0.3, t_osm=0.45, mode="intersection", alpha=0.5, beta=2.0, p=0.8,
              seed=11, name="w", offset=6, patches_are_deltas=True, return_masks=True)
    ops.set_backend("triton")
    try:
        want = ops.masked_merge(*case, **kw)
        seen = []
        got = _compiled(lambda *c: ops.masked_merge(*c, **kw), seen)(*case)
    finally:
        ops.set_backend(None)
    assert "safepatch.triton_masked_merge" in seen, seen
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert 0 < int(want.applied_se.sum()) < case.base.numel()


def test_kernels_registered_per_dispatch_key():
    """The extension's kernels sit on the CPU key (CUDA only where built), the Triton ones on
    CUDA (and CPU under the interpreter); autograd falls through for all of them."""
    require_backend("cpp", "cpu")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in library.OPS + library.CLASSIC_OPS:
        assert has(f"safepatch::{op}", "CPU") and has(f"safepatch::{op}", "Autograd"), op
    for op in library.CLASSIC_OPS:
        assert not has(f"safepatch::{op}", "CUDA"), op
    assert library.triton_ops()
    for op in library.OPS:
        assert has(f"safepatch::triton_{op}", "CUDA"), op
        assert has(f"safepatch::triton_{op}", "CPU") == (os.environ.get("TRITON_INTERPRET") == "1")


def test_compiled_without_the_extension_traces_the_reference(monkeypatch):
    """SAFEPATCH_NO_EXT=1: the public op falls back to the plain-torch reference, compiled too."""
    monkeypatch.setenv("SAFEPATCH_NO_EXT", "1")
    s = rand_scores(N, torch.bfloat16, 17)
    seen = []
    torch._dynamo.reset()

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    got = torch.compile(lambda x: ops.radix_histogram(x, 0, 0), fullgraph=True,
                        backend=backend)(s)
    assert not any("safepatch" in t for t in seen), seen
    assert torch.equal(got, ops.reference.radix_histogram(s))
