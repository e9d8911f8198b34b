"""radix_histogram on every backend against the reference: all dtypes, both digits, special
values (-0, zeros, denormals, negatives, inf, NaN), chunks adding up to the whole."""
import pytest
import torch

from op_cases import FLOATS, backend, rand_scores, require_backend  # noqa: F401
from safepatch_merge import ops
from safepatch_merge.ops import reference as ref


def _specials(dtype):
    vals = [0.0, -0.0, 1e-40, 5.9e-8, 1.0, 0.5, 3.0e38, float("inf"), float("nan"), -1.0,
            -float("inf"), 65504.0, 2.0 ** -14]
    return torch.tensor(vals * 7, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_matches_reference(backend, dtype):
    s = torch.cat([rand_scores((3001,), dtype, 1), _specials(dtype)])
    h0 = ops.radix_histogram(s.to(backend.device), 0, 0)
    assert h0.dtype == torch.int64 and h0.shape == (65536,) and h0.device == backend.device
    want0 = ref.radix_histogram(s, 0, 0)
    assert torch.equal(h0.cpu(), want0)
    assert int(h0.sum()) == s.numel()
    # digit 1 under the busiest bins, under bin 0 (zeros, -0, denormals) and an empty bin
    prefixes = [int(b) for b in torch.topk(want0, 3).indices] + [0, 0x7FC0, 0xFFFF, 12345]
    for prefix in prefixes:
        h1 = ops.radix_histogram(s.to(backend.device), prefix, 1)
        assert torch.equal(h1.cpu(), ref.radix_histogram(s, prefix, 1)), f"prefix {prefix:#x}"


def test_minus_zero_counts_as_zero(backend):
    s = torch.tensor([-0.0] * 5 + [0.0] * 3)
    h = ops.radix_histogram(s.to(backend.device), 0, 0).cpu()
    assert int(h[0]) == 8 and int(h.sum()) == 8
    h1 = ops.radix_histogram(s.to(backend.device), 0, 1).cpu()
    assert int(h1[0]) == 8


def test_heavy_bins(backend):
    """Bins far past 16-bit counts (the CUDA kernel packs 16-bit counters and carries every
    32768 counts to the output): zeros (bin 0, warp-aggregated there) and one repeated value,
    both digits, in an order that interleaves them."""
    n_zero, n_one, n_rest = 70_001, 98_304 + 5, 3_001
    s = torch.cat([torch.zeros(n_zero), torch.full((n_one,), 0.75), rand_scores((n_rest,), torch.float32, 9)])
    s = s[torch.randperm(s.numel(), generator=torch.Generator().manual_seed(0))]
    h0 = ops.radix_histogram(s.to(backend.device), 0, 0).cpu()
    assert torch.equal(h0, ref.radix_histogram(s, 0, 0))
    assert int(h0[0]) >= n_zero and int(h0[0x3F40]) >= n_one
    h1 = ops.radix_histogram(s.to(backend.device), 0x3F40, 1).cpu()
    assert torch.equal(h1, ref.radix_histogram(s, 0x3F40, 1)) and int(h1[0]) >= n_one


def test_chunks_add_up(backend):
    s = rand_scores((2999,), torch.float32, 2)
    whole = ops.radix_histogram(s.to(backend.device), 0, 0).cpu()
    parts = sum(ops.radix_histogram(s[a:b].to(backend.device), 0, 0).cpu()
                for a, b in ((0, 1), (1, 1500), (1500, 2999)))
    assert torch.equal(parts, whole)


def test_empty_and_shapes(backend):
    assert int(ops.radix_histogram(torch.empty(0, device=backend.device)).sum()) == 0
    s = rand_scores((3, 7, 11), torch.bfloat16, 3)
    assert torch.equal(ops.radix_histogram(s.to(backend.device)).cpu(), ref.radix_histogram(s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_many_workers(dtype):
    """Large enough that the C++ kernel splits the work into per-thread histograms."""
    require_backend("cpp", "cpu")
    from safepatch_merge.ops import cpp_backend

    s = rand_scores((1 << 20) + 3, dtype, 4)
    want = ref.radix_histogram(s, 0, 0)
    assert torch.equal(cpp_backend.radix_histogram(s, 0, 0), want)
    prefix = int(torch.argmax(want))
    assert torch.equal(cpp_backend.radix_histogram(s, prefix, 1), ref.radix_histogram(s, prefix, 1))


def test_rejects_bad_arguments(backend):
    s = torch.rand(10, device=backend.device)
    with pytest.raises(ValueError, match="digit must be 0 or 1, got 2"):
        ops.radix_histogram(s, 0, 2)
    with pytest.raises(ValueError, match=r"prefix must be in \[0, 65535\] for digit 1, got 65536"):
        ops.radix_histogram(s, 65536, 1)
    with pytest.raises(TypeError, match="scores has dtype int32"):
        ops.radix_histogram(s.int())
    with pytest.raises(ValueError, match="scores must be contiguous"):
        ops.radix_histogram(torch.rand(20, device=backend.device)[::2])
    with pytest.raises(ValueError, match="scores has unsupported layout"):
        ops.radix_histogram(torch.rand(10).to_sparse())


# NaN bit patterns of each dtype: quiet, signalling (payload only in low bits), negative.
_NAN_BITS = {
    torch.float32: (torch.int32, 32, [0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0xFFC00000, 0xFF800001]),
    torch.bfloat16: (torch.int16, 16, [0x7F81, 0x7FC0, 0x7FFF, 0xFFC0, 0xFF81]),
    torch.float16: (torch.int16, 16, [0x7C01, 0x7E00, 0x7FFF, 0xFE00, 0xFC01]),
}


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_nan_lands_in_one_bin(backend, dtype):
    """Any NaN has the one key 0x7FC00000 on every backend (widening fp16 NaNs may or may not
    quiet them, so raw bits would give backend-dependent bins)."""
    int_dt, width, pats = _NAN_BITS[dtype]
    signed = [v - (1 << width) if v >= 1 << (width - 1) else v for v in pats]
    nans = torch.tensor(signed * 3, dtype=int_dt).view(dtype)
    assert bool(torch.isnan(nans).all())
    assert bool((ref.score_keys(nans) == 0x7FC00000).all())
    s = torch.cat([nans, torch.tensor([1.0, float("inf"), 0.0], dtype=dtype)])
    h0 = ops.radix_histogram(s.to(backend.device), 0, 0).cpu()
    assert int(h0[0x7FC0]) == nans.numel() and int(h0[0x7F80]) == 1 and int(h0[0x3F80]) == 1
    assert int(h0[0]) == 1 and int(h0.sum()) == s.numel()
    h1 = ops.radix_histogram(s.to(backend.device), 0x7FC0, 1).cpu()
    assert int(h1[0]) == nans.numel() and int(h1.sum()) == nans.numel()


# ---------------------------------------------------------------- retained scores

def _retained_by_hand(s, p, seed, name, patch_id, offset):
    """Keys of the retained scores without the reference's helper: Philox words straight from
    the generator, the keep rule of docs/design.md §1, dropped valid scores as key 0."""
    from safepatch_merge.ops.philox import keep_threshold, retention_words

    keys = ref.score_keys(s).reshape(-1)
    words = retention_words(keys.numel(), offset, seed, name, patch_id)
    kept = (words < keep_threshold(p)) | (keys >= 0x7F800000)
    return torch.where(kept, keys, torch.zeros_like(keys))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("offset", [0, 3, (1 << 33) + 6])
def test_retained_matches_keys_by_hand(backend, dtype, offset):
    s = torch.cat([rand_scores((3001,), dtype, 5), _specials(dtype)])
    kw = dict(p=0.35, seed=2**33 + 7, name="model.layers.0.mlp.up_proj.weight", offset=offset)
    for patch_id in (0, 1):
        keys = _retained_by_hand(s, patch_id=patch_id, **kw)
        h0 = ops.radix_histogram(s.to(backend.device), 0, 0, patch_id=patch_id, **kw).cpu()
        assert torch.equal(h0, torch.bincount(keys >> 16, minlength=65536))
        # invalid scores keep their keys whether drawn or not: validation sees all of them
        assert int(h0[0x7F80:].sum()) == int(ref.radix_histogram(s, 0, 0)[0x7F80:].sum()) > 0
        assert int(h0[0]) > int((ref.score_keys(s) == 0).sum())  # dropped scores moved to 0
        # busy bins (few keys per tile in the C++ kernel's sparse path), zeros, and invalid
        # bins (NaN, inf, -1: counted whether drawn or not)
        for prefix in [int(b) for b in torch.topk(h0[1:0x7F80], 2).indices + 1] + \
                [0, 0x7FC0, 0x7F80, 0xBF80]:
            h1 = ops.radix_histogram(s.to(backend.device), prefix, 1, patch_id=patch_id, **kw)
            want = torch.bincount(keys[(keys >> 16) == prefix] & 0xFFFF, minlength=65536)
            assert torch.equal(h1.cpu(), want), f"prefix {prefix:#x}"
    # SE and OSM draw different streams; p = 1 is the plain histogram
    assert not torch.equal(ops.radix_histogram(s.to(backend.device), 0, 0, patch_id=0, **kw),
                           ops.radix_histogram(s.to(backend.device), 0, 0, patch_id=1, **kw))
    plain = ops.radix_histogram(s.to(backend.device), 0, 0, **dict(kw, p=1.0)).cpu()
    assert torch.equal(plain, ref.radix_histogram(s, 0, 0))


def test_retained_chunks_add_up(backend):
    s = rand_scores((2999,), torch.float32, 6)
    kw = dict(p=0.5, seed=3, name="emb", patch_id=1)
    whole = ops.radix_histogram(s.to(backend.device), 0, 0, offset=0, **kw).cpu()
    assert torch.equal(whole, ref.radix_histogram(s, 0, 0, offset=0, **kw))
    for digit, prefix in ((0, 0), (1, int(torch.argmax(whole[1:])) + 1), (1, 0)):
        whole = ops.radix_histogram(s.to(backend.device), prefix, digit, offset=0, **kw).cpu()
        parts = sum(ops.radix_histogram(s[a:b].to(backend.device), prefix, digit, offset=a,
                                        **kw).cpu()
                    for a, b in ((0, 1), (1, 1502), (1502, 2999)))
        assert torch.equal(parts, whole), (digit, prefix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_many_workers_retained(dtype):
    require_backend("cpp", "cpu")
    from safepatch_merge.ops import cpp_backend

    s = rand_scores((1 << 20) + 3, dtype, 7)
    kw = dict(p=0.7, seed=11, name="w", patch_id=0, offset=5)
    want = ref.radix_histogram(s, 0, 0, **kw)
    assert torch.equal(cpp_backend.radix_histogram(s, 0, 0, **kw), want)
    prefix = int(torch.argmax(want[1:])) + 1
    assert torch.equal(cpp_backend.radix_histogram(s, prefix, 1, **kw),
                       ref.radix_histogram(s, prefix, 1, **kw))


def test_retained_rejects_bad_arguments(backend):
    s = torch.rand(10, device=backend.device)
    with pytest.raises(ValueError, match=r"retention rate p must be in \[0, 1\]"):
        ops.radix_histogram(s, p=1.5)
    with pytest.raises(ValueError, match="patch_id must be 0 .SE. or 1 .OSM., got 2"):
        ops.radix_histogram(s, p=0.5, patch_id=2)
    with pytest.raises(ValueError, match="offset must be a non-negative int"):
        ops.radix_histogram(s, p=0.5, offset=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        ops.radix_histogram(s, p=0.5, seed=-1)


def test_retained_heavy_bin(backend):
    """A digit-1 prefix holding most keys of every tile (the C++ kernel draws the whole tile's
    words there, not one Philox call per key)."""
    s = torch.cat([torch.full((3000,), 0.75), rand_scores((1001,), torch.float32, 8)])
    s = s[torch.randperm(s.numel(), generator=torch.Generator().manual_seed(1))]
    kw = dict(p=0.4, seed=5, name="heavy", patch_id=0, offset=2)
    keys = _retained_by_hand(s, **kw)
    for prefix in (0x3F40, 0):
        got = ops.radix_histogram(s.to(backend.device), prefix, 1, **kw).cpu()
        assert torch.equal(got, torch.bincount(keys[(keys >> 16) == prefix] & 0xFFFF,
                                               minlength=65536)), prefix
    assert 0.3 * 3000 < int(got[0]) and int(ops.radix_histogram(
        s.to(backend.device), 0x3F40, 1, **kw).cpu()[0]) < 0.5 * 3000
