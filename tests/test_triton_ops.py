"""Triton kernels against the plain-torch reference (triton_kernels/, ops/triton_backend.py).

On a machine without CUDA these run under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels on the GPU. Sizes are
odd and grids tiny (the interpreter runs programs one by one); kernels take small block
sizes here so every test still spans several programs and partial tiles.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, requires_cuda
from safepatch_merge import ops
from safepatch_merge.ops import philox as ref_philox
from safepatch_merge.ops import reference as ref
from safepatch_merge.merge.select import select_thresholds

triton = pytest.importorskip("triton")
from safepatch_merge.ops import triton_backend  # noqa: E402
from safepatch_merge.triton_kernels import histogram as tk_hist  # noqa: E402
from safepatch_merge.triton_kernels import masked_merge as tk_merge  # noqa: E402
from safepatch_merge.triton_kernels import philox as tk_philox  # noqa: E402
from safepatch_merge.triton_kernels import saliency as tk_sal  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MODE_IDS = {m: i for i, m in enumerate(ref.MODES)}


@pytest.fixture
def triton_ops():
    """Public ops forced onto the Triton backend (restored afterwards)."""
    assert triton_backend.available(DEV), "triton backend should serve this device"
    ops.set_backend("triton")
    yield ops
    ops.set_backend(None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between same-dtype float tensors (ordered bit patterns)."""
    assert a.dtype == b.dtype
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]

    def ordered(x):
        i = x.contiguous().view(bits).to(torch.int64)
        sign = 1 << (8 * x.element_size() - 1)
        return torch.where(i < 0, -(i + sign), i)  # two's-complement order of sign-magnitude

    return (ordered(a.cpu()) - ordered(b.cpu())).abs()


# ---------------------------------------------------------------- Philox retention words

@pytest.mark.parametrize("numel,offset", [(1, 0), (37, 0), (523, 1), (777, 2), (4099, 3),
                                          (611, (1 << 32) - 6), (300, (1 << 34) + 7),
                                          (129, (1 << 62) + 1)])
@pytest.mark.parametrize("patch_id", [0, 1])
def test_philox_words_match_reference(numel, offset, patch_id):
    seed, name = 2**40 + 12345, "model.layers.7.mlp.up_proj.weight"
    got = tk_philox.retention_words(numel, offset, seed, ref_philox.fnv1a32(name), patch_id,
                                    device=DEV, rows=64)
    want = ref_philox.retention_words(numel, offset, seed, name, patch_id)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), want)


def test_philox_words_known_answer():
    # Random123 kat_vectors: philox4x32_10 with counter = key = 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    # Element i of a tensor whose name hashes to k1 uses counter (i>>2, 0, patch, 0) and key
    # (seed, k1): with seed = 0 we need name_hash = 0, which the launcher accepts directly.
    got = tk_philox.retention_words(4, 0, 0, 0, 0, device=DEV).cpu().tolist()
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# ---------------------------------------------------------------- saliency accumulation

@pytest.mark.parametrize("wdt,gdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("n", [1, 1000, 4097])
def test_saliency_matches_reference(triton_ops, wdt, gdt, n):
    g = _gen(n)
    score = torch.randn(n, generator=g).to(DEV)
    w = torch.randn(n, generator=g).to(wdt).to(DEV)
    grad = (torch.randn(n, generator=g) * 1e-3).to(gdt).to(DEV)
    want = ref.saliency_accumulate_(score.clone(), w, grad, 0.3125 / 3)
    got = score.clone()
    res = triton_ops.saliency_accumulate_(got, w, grad, 0.3125 / 3)
    assert res.data_ptr() == got.data_ptr(), "must be in place"
    assert int(_ulp_distance(got, want).max()) <= 1
    # FMA contraction is off, so the kernel rounds exactly like the reference.
    assert torch.equal(got, want)


def test_saliency_multiple_programs_and_shapes():
    g = _gen(3)
    score = torch.randn(3, 5, 67, generator=g).to(DEV)
    w = torch.randn(3, 5, 67, generator=g).to(torch.bfloat16).to(DEV)
    grad = torch.randn(3, 5, 67, generator=g).to(DEV)
    want = ref.saliency_accumulate_(score.clone(), w, grad, -2.5)
    got = tk_sal.saliency_accumulate_(score.clone(), w, grad, -2.5, block=128)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- radix histogram

def _assert_same_histogram(got: torch.Tensor, want: torch.Tensor, digit: int = 0) -> None:
    """Bit-exact, NaN bins included: every NaN has the one key 0x7FC00000 on every backend."""
    assert got.dtype == torch.int64 and got.shape == (65536,)
    assert torch.equal(got.cpu(), want.cpu())


def _scores(n: int, dtype: torch.dtype, seed: int, specials: bool = True) -> torch.Tensor:
    g = _gen(seed)
    x = torch.rand(n, generator=g) ** 4 * torch.randint(0, 3, (n,), generator=g)  # zeros, ties
    if specials and n >= 8:
        x[:8] = torch.tensor([-0.0, 0.0, -1.0, float("inf"), float("nan"), 1e-45, 3e38, -3e-39])
    return x.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 999, 5003])
def test_histogram_digit0_exact(triton_ops, dtype, n):
    x = _scores(n, dtype, n)
    got = triton_ops.radix_histogram(x, 0, 0)
    want = ref.radix_histogram(x.cpu(), 0, 0)
    assert got.device == x.device
    _assert_same_histogram(got, want)
    assert int(got.sum()) == n


@pytest.mark.parametrize("dtype", FLOATS)
def test_histogram_digit1_exact(triton_ops, dtype):
    x = _scores(4001, dtype, 11)
    keys = ref.score_keys(x.cpu()).reshape(-1)
    for prefix in (int(keys[100] >> 16), int(keys[3000] >> 16), 0, 0x7F80, 0x8000 | 0x3F80, 12345):
        got = triton_ops.radix_histogram(x, prefix, 1)
        want = ref.radix_histogram(x.cpu(), prefix, 1)
        assert torch.equal(got.cpu(), want), prefix


def test_histogram_private_copies_and_chunks_add_up():
    x = _scores(6007, torch.float32, 5)
    want = ref.radix_histogram(x.cpu(), 0, 0)
    got = tk_hist.radix_histogram(x, 0, 0, block=256, copies=5)
    _assert_same_histogram(got, want)
    parts = sum(tk_hist.radix_histogram(c.contiguous(), 0, 0, block=512) for c in x.split(1234))
    _assert_same_histogram(parts, want)


def test_histogram_all_equal_scores():
    # The worst case for atomics: every element in one bin.
    x = torch.full((3001,), 0.125, device=DEV)
    got = tk_hist.radix_histogram(x, 0, 0, block=512, copies=2)
    assert int(got[0x3E00]) == 3001 and int(got.sum()) == 3001
    z = torch.zeros(3001, device=DEV)  # bin 0 is counted by a block reduction
    z[::2] = -0.0
    z[5] = 2.0
    for digit in (0, 1):
        assert torch.equal(tk_hist.radix_histogram(z, 0, digit, block=512).cpu(), ref.radix_histogram(z.cpu(), 0, digit))


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_thresholds_identical_to_reference(granularity):
    g = _gen(21)
    scores = {f"model.layers.{i}.w": (torch.rand(700 + 97 * i, generator=g) ** 3).to(DEV) for i in range(3)}
    scores["model.layers.1.w"][:50] = 0.0
    scores["model.layers.2.w"][::7] = scores["model.layers.2.w"][3]  # ties
    for rate in (0.013, 0.1, 0.5):
        want = select_thresholds({k: v.cpu() for k, v in scores.items()}, rate, granularity,
                                 hist_fn=ref.radix_histogram)
        got = select_thresholds(scores, rate, granularity, hist_fn=triton_backend.radix_histogram)
        assert got == want


# ---------------------------------------------------------------- masked merge

def _merge_inputs(n: int, seed: int, bdt=torch.bfloat16, pdt=torch.bfloat16, sdt=torch.float32,
                  deltas=True, shape=None):
    g = _gen(seed)
    shape = shape or (n,)
    base = torch.randn(shape, generator=g)
    d_se = torch.randn(shape, generator=g) * 0.02
    d_osm = torch.randn(shape, generator=g) * 0.02
    p_se, p_osm = (d_se, d_osm) if deltas else (base + d_se, base + d_osm)
    s_se = torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) > 0.1)
    s_osm = torch.rand(shape, generator=g)
    s_osm.view(-1)[::11] = s_se.view(-1)[::11]  # overlap between the two top sets
    cast = lambda t, dt: t.to(dt).to(DEV)  # noqa: E731
    return (cast(base, bdt), cast(p_se, pdt), cast(p_osm, pdt), cast(s_se, sdt), cast(s_osm, sdt))


def _merge_kw(**over):
    kw = dict(t_se=0.8, t_osm=0.75, mode="difference", alpha=1.25, beta=0.75, p=0.7, rescale=True,
              seed=2**33 + 99, name="model.layers.0.self_attn.q_proj.weight", offset=0,
              patches_are_deltas=True, out_dtype=None, return_masks=True)
    kw.update(over)
    return kw


def _check_merge(got, want, out_dtype):
    out, m_se, m_osm = got
    w_out, w_se, w_osm = want
    assert out.dtype == out_dtype and out.shape == w_out.shape and out.device.type == DEV.type
    assert m_se.dtype == torch.bool and m_se.shape == w_out.shape
    # the reference's masks and output may sit on either device (mode none: base's device)
    assert torch.equal(m_se.cpu(), w_se.cpu()) and torch.equal(m_osm.cpu(), w_osm.cpu())
    assert int(_ulp_distance(out, w_out).max()) <= 1
    assert torch.equal(out.cpu(), w_out.cpu())  # FMA off: bit-identical rounding


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("bdt,pdt,sdt,out_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float32, torch.float16, torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32, torch.float32),
])
@pytest.mark.parametrize("deltas", [True, False])
def test_merge_matches_reference(triton_ops, mode, bdt, pdt, sdt, out_dtype, deltas):
    n = 2053
    ins = _merge_inputs(n, 7, bdt, pdt, sdt, deltas)
    kw = _merge_kw(mode=mode, patches_are_deltas=deltas, out_dtype=out_dtype, offset=5)
    got = triton_ops.masked_merge(*ins, **kw)
    want = ref.masked_merge(*(t.cpu() for t in ins), **kw)
    _check_merge(got, want, out_dtype)
    if mode != "none":
        assert 0 < int(want[1].sum()) < n and 0 < int(want[2].sum()) < n  # rates inside (0, 1)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, (1 << 32) - 2, (1 << 32) + 1, (1 << 35) + 6, (1 << 40) + 3])
def test_merge_offsets_beyond_2_32(offset):
    ins = _merge_inputs(1031, 3)
    kw = _merge_kw(offset=offset, out_dtype=torch.bfloat16)
    args = dict(key_se=ref.threshold_key(kw["t_se"]), key_osm=ref.threshold_key(kw["t_osm"]), mode=0,
                c_se=kw["alpha"] / kw["p"], c_osm=kw["beta"] / kw["p"],
                keep_threshold=ref_philox.keep_threshold(kw["p"]), seed=kw["seed"],
                name_hash=ref_philox.fnv1a32(kw["name"]), offset=offset, deltas=True,
                out_dtype=torch.bfloat16, return_masks=True)
    got = tk_merge.masked_merge(*ins, **args, rows=64)
    want = ref.masked_merge(*(t.cpu() for t in ins), **{**kw, "mode": "difference"})
    _check_merge(got, want, torch.bfloat16)


def test_merge_chunked_equals_whole():
    n = 3001
    ins = _merge_inputs(n, 9, shape=(n,))
    kw = _merge_kw(out_dtype=torch.bfloat16, offset=(1 << 33) + 1)
    whole = triton_backend.masked_merge(*ins, **kw)
    cuts = [0, 5, 518, 1027, 2002, n]  # odd, unaligned chunk boundaries
    parts = [triton_backend.masked_merge(*(t[a:b].contiguous() for t in ins),
                                         **{**kw, "offset": kw["offset"] + a})
             for a, b in zip(cuts, cuts[1:])]
    for k in range(3):
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])


@pytest.mark.parametrize("which", ["se_only", "osm_only", "neither"])
def test_merge_absent_patches(triton_ops, which):
    base, p_se, p_osm, s_se, s_osm = _merge_inputs(999, 4)
    if which in ("osm_only", "neither"):
        p_se = s_se = None
    if which in ("se_only", "neither"):
        p_osm = s_osm = None
    for mode in ("difference", "none"):
        kw = _merge_kw(mode=mode)
        got = triton_ops.masked_merge(base, p_se, p_osm, s_se, s_osm, **kw)
        want = ref.masked_merge(*(t.cpu() if t is not None else None
                                  for t in (base, p_se, p_osm, s_se, s_osm)), **{**kw, "out_dtype": base.dtype})
        _check_merge(got, want, base.dtype)


@pytest.mark.parametrize("p,rescale", [(1.0, False), (0.0, False), (0.37, False), (0.5, True)])
def test_merge_retention_rates(triton_ops, p, rescale):
    ins = _merge_inputs(1500, 8)
    kw = _merge_kw(p=p, rescale=rescale, t_se=0.0, t_osm=math.inf, mode="topk")
    got = triton_ops.masked_merge(*ins, **kw)
    want = ref.masked_merge(*(t.cpu() for t in ins), **{**kw, "out_dtype": ins[0].dtype})
    _check_merge(got, want, ins[0].dtype)
    assert not bool(want[2].any())  # t = +inf selects nothing
    if p == 1.0:
        assert torch.equal(want[1], ref.score_keys(ins[3].cpu()) > 0)


def test_merge_without_masks_and_shapes(triton_ops):
    ins = _merge_inputs(0, 12, shape=(7, 3, 41))
    kw = _merge_kw(return_masks=False, out_dtype=torch.float32)
    out = triton_ops.masked_merge(*ins, **kw)
    want = ref.masked_merge(*(t.cpu() for t in ins), **kw)
    assert out.shape == (7, 3, 41) and torch.equal(out.cpu(), want)
    raw = tk_merge.masked_merge(ins[0], None, None, None, None, 0, 0, 3, 1.0, 1.0, 1 << 32, 0, 0, 0,
                                True, torch.bfloat16, False)
    assert raw[1].numel() == 0 and raw[2].numel() == 0 and torch.equal(raw[0], ins[0])


def test_merge_empty_tensor(triton_ops):
    e = torch.empty(0, 5, dtype=torch.bfloat16, device=DEV)
    out = triton_ops.masked_merge(e, e, e, e, e, **_merge_kw(return_masks=False))
    assert out.shape == (0, 5)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 inf, on purpose
def test_output_rounding_to_nearest_even():
    # No patch applied: out = base narrowed to out dtype, so this checks the kernel's own
    # fp32 -> bf16/fp16 rounding (ties, carries into the exponent, overflow, subnormals).
    vals = [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65504.0, 65519.0,
            65520.0, 1e6, -1e6, 6e-5, 6.1e-5, 2**-24, 2**-25, 1.5 * 2**-25, 3 * 2**-26, 2**-14 - 2**-25,
            5.96e-8, 1e-40, -1e-40, 3.4e38, -3.4e38, float("inf"), -float("inf"), 0.1, -0.1,
            (2 - 2**-23) * 2**127, 1.9921875 * 2**127 + 2**112]
    g = _gen(5)
    rnd = torch.randn(2000, generator=g) * torch.exp2(torch.randint(-30, 20, (2000,), generator=g).float())
    bits = torch.randint(0, 2**31 - 1, (2000,), generator=g, dtype=torch.int64).to(torch.int32)
    base = torch.cat([torch.tensor(vals, dtype=torch.float32), rnd, bits.view(torch.float32)])
    base = base[torch.isfinite(base) | torch.isinf(base)].to(DEV)  # NaN payloads aside
    for out_dtype in (torch.bfloat16, torch.float16):
        out, _, _ = tk_merge.masked_merge(base, None, None, None, None, 0, 0, 3, 1.0, 1.0, 1 << 32,
                                          0, 0, 0, True, out_dtype, False, rows=256)
        want = base.cpu().to(out_dtype)
        assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16)), out_dtype


# ---------------------------------------------------------------- compiled code

@pytest.mark.skipif(HAS_CUDA, reason="on a GPU every test above runs compiled kernels")
def test_kernels_compile_for_hopper_without_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = env.get("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))
    script = Path(__file__).with_name("triton_aot.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]



@requires_cuda
def test_gpu_large_tensors_match_reference():
    n = (1 << 24) + 12345  # several private histogram copies, many programs
    x = _scores(n, torch.float32, 99)
    _assert_same_histogram(tk_hist.radix_histogram(x, 0, 0), ref.radix_histogram(x.cpu(), 0, 0))
    ins = _merge_inputs(1 << 22, 1)
    kw = _merge_kw(out_dtype=torch.bfloat16, offset=(1 << 33) + 2)
    got = triton_backend.masked_merge(*ins, **kw)
    want = ref.masked_merge(*ins, **kw)  # plain torch on the GPU
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert int(_ulp_distance(got[0], want[0]).max()) <= 1


@requires_cuda
def test_gpu_tensors_on_second_device_or_default():
    # Kernels launch on the tensors' device, whatever the current device is.
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x = _scores(10007, torch.float32, 1).to(dev)
    _assert_same_histogram(triton_backend.radix_histogram(x, 0, 0), ref.radix_histogram(x.cpu(), 0, 0))


# ---------------------------------------------------------------- CUDA C++ kernels (csrc/cuda)

def _cuda_ext():
    from safepatch_merge.ops import _extension

    if not _extension.has_cuda():
        pytest.fail(f"the extension has no CUDA kernels on this CUDA machine: {_extension.error()}")
    return torch.ops.safepatch


@requires_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_ext_histogram(dtype):
    ext = _cuda_ext()
    x = _scores(3 * 57344 + 1001, dtype, 17)  # several rounds of the shared sub-histogram
    for xs in (x, x[1:]):  # aligned (vector loads) and misaligned (scalar loads)
        _assert_same_histogram(ext.radix_histogram(xs, 0, 0), ref.radix_histogram(xs.cpu(), 0, 0))
        prefix = int(ref.score_keys(xs[5000:5001].cpu())[0]) >> 16
        assert torch.equal(ext.radix_histogram(xs, prefix, 1).cpu(), ref.radix_histogram(xs.cpu(), prefix, 1))
    same = torch.full((200_003,), 0.375, dtype=dtype, device=DEV)  # one bin: 16-bit counters flush
    h = ext.radix_histogram(same, 0, 0)
    assert int(h.sum()) == 200_003 and int(h.max()) == 200_003
    zeros = torch.zeros(200_003, dtype=dtype, device=DEV)  # bin 0 is warp-aggregated
    zeros[::3] = -0.0
    zeros[7] = 1.0
    for digit in (0, 1):
        assert torch.equal(ext.radix_histogram(zeros, 0, digit).cpu(), ref.radix_histogram(zeros.cpu(), 0, digit))


@requires_cuda
@pytest.mark.parametrize("wdt,gdt", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_cuda_ext_saliency(wdt, gdt):
    ext = _cuda_ext()
    g = _gen(2)
    score = torch.randn(10_003, generator=g).to(DEV)
    w = torch.randn(10_003, generator=g).to(wdt).to(DEV)
    grad = torch.randn(10_003, generator=g).to(gdt).to(DEV)
    for sl in (slice(0, None), slice(1, None)):
        want = ref.saliency_accumulate_(score[sl].clone(), w[sl], grad[sl], 0.7)
        got = score[sl].clone()
        ext.saliency_accumulate_(got, w[sl], grad[sl], 0.7)
        assert torch.equal(got, want)


@requires_cuda
@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("offset", [0, 3, (1 << 33) + 2])
@pytest.mark.parametrize("deltas", [True, False])
def test_cuda_ext_merge(mode, offset, deltas):
    ext = _cuda_ext()
    ins = _merge_inputs(4099, 6, torch.bfloat16, torch.float32, torch.float16, deltas)
    kw = _merge_kw(mode=mode, offset=offset, patches_are_deltas=deltas, out_dtype=torch.bfloat16)
    want = ref.masked_merge(*ins, **kw)
    s = kw["p"]
    got = ext.masked_merge(*ins, ref.threshold_key(kw["t_se"]), ref.threshold_key(kw["t_osm"]), MODE_IDS[mode],
                           kw["alpha"] / s, kw["beta"] / s, ref_philox.keep_threshold(s), kw["seed"] & 0xFFFFFFFF,
                           ref_philox.fnv1a32(kw["name"]), offset, deltas, torch.bfloat16, True)
    _check_merge(got, want, torch.bfloat16)
    # Chunks that start off a Philox block boundary give the same masks and values.
    cuts = [0, 1, 1030, 4099]
    parts = [ext.masked_merge(*(t[a:b].contiguous() for t in ins), ref.threshold_key(kw["t_se"]),
                              ref.threshold_key(kw["t_osm"]), MODE_IDS[mode], kw["alpha"] / s, kw["beta"] / s,
                              ref_philox.keep_threshold(s), kw["seed"] & 0xFFFFFFFF, ref_philox.fnv1a32(kw["name"]),
                              offset + a, deltas, torch.bfloat16, True) for a, b in zip(cuts, cuts[1:])]
    for k in range(3):
        assert torch.equal(torch.cat([p[k] for p in parts]), got[k])


def test_scalar_arguments_equal_to_one():
    # Compiled Triton makes int arguments equal to 1 compile-time constants unless told not
    # to; every scalar the kernels bit-cast must survive the value 1 (seed, hash, prefix...).
    def words(numel, offset, patch_id):  # reference words for key (1, 1), by hand
        blk = torch.arange(offset, offset + numel) >> 2
        w = torch.stack(ref_philox.philox4x32_10((blk, 0, patch_id, 0), (1, 1)), dim=-1)
        return w[torch.arange(numel), (torch.arange(offset, offset + numel) & 3)]

    got = tk_philox.retention_words(9, 1, 1, 1, 1, device=DEV).cpu()
    assert torch.equal(got, words(9, 1, 1))

    x = torch.tensor([2**-149 * (65536 + k) for k in range(5)] + [1.0], device=DEV)  # digit 0 == 1
    h = tk_hist.radix_histogram(x, 1, 1)
    assert torch.equal(h.cpu(), ref.radix_histogram(x.cpu(), 1, 1)) and int(h[:5].sum()) == 5

    base, p_se, p_osm, s_se, s_osm = _merge_inputs(101, 13)
    n = base.numel()
    for keep in (1 << 31, 1):
        out, a_se, a_osm = tk_merge.masked_merge(base, p_se, p_osm, s_se, s_osm, 1, 1, 2, 1.0, 1.0, keep,
                                                 1, 1, 1, True, torch.float32, True)  # mode topk
        want_se = (ref.score_keys(s_se.cpu()) > 0) & (words(n, 1, 0) < keep)  # key >= 1
        want_osm = (ref.score_keys(s_osm.cpu()) > 0) & (words(n, 1, 1) < keep)
        assert torch.equal(a_se.cpu(), want_se) and torch.equal(a_osm.cpu(), want_osm)
        b = base.cpu().float()
        want = torch.where(want_se, b + p_se.cpu().float(), b)
        want = torch.where(want_osm, want + p_osm.cpu().float(), want)
        assert torch.equal(out.cpu(), want)
        assert bool(want_se.any() and want_osm.any()) == (keep > 1)  # keep 1: word 0 only, ~never
