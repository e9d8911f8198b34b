"""Philox4x32-10 and the retention stream: Random123 known answers, reference vs C++ words."""
import pytest
import torch

from op_cases import require_backend
from safepatch_merge.ops import philox

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Offsets near 0, around 2^32 elements, where the block index i>>2 crosses 2^32 (its high
# word starts counting at element 2^34) and far beyond.
OFFSETS = [0, 1, 3, 5, (1 << 32) - 7, (1 << 34) - 9, (1 << 34) + 2, (1 << 40) + 3, (1 << 62) - 1001]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_reference_known_answers(ctr, key, want):
    got = philox.philox4x32_10(ctr, key)
    assert tuple(int(x) for x in got) == want


def test_reference_batched_equals_one_by_one():
    ctrs = [(0, 0, 0, 0), (5, 1, 1, 0), (0xFFFFFFFF, 7, 0, 0)]
    batch = philox.philox4x32_10(tuple(torch.tensor([c[j] for c in ctrs]) for j in range(4)), (9, 11))
    for k, c in enumerate(ctrs):
        one = philox.philox4x32_10(c, (9, 11))
        assert [int(w[k]) for w in batch] == [int(w) for w in one]


def test_fnv1a32_known_values():
    assert philox.fnv1a32("") == 0x811C9DC5
    assert philox.fnv1a32("a") == 0xE40C292C
    assert philox.fnv1a32("foobar") == 0xBF9CF968


def test_keep_threshold():
    assert philox.keep_threshold(0.0) == 0
    assert philox.keep_threshold(0.5) == 1 << 31
    assert philox.keep_threshold(1.0) == 1 << 32
    assert philox.keep_threshold(0.1) == 429496729  # floor(0.1 * 2^32), exact in binary64
    for bad in (-0.01, 1.0001, float("nan")):
        with pytest.raises(ValueError, match="retention rate p must be in"):
            philox.keep_threshold(bad)


def test_retention_words_are_the_blocks_words():
    # element i takes word i & 3 of block i >> 2 with counter (lo(i>>2), hi(i>>2), patch, 0)
    off = (1 << 34) - 6
    w = philox.retention_words(8, off, seed=7 + (1 << 32), name="w", patch_id=1)
    for j in range(8):
        i = off + j
        blk = philox.philox4x32_10((i >> 2 & 0xFFFFFFFF, i >> 34, 1, 0), (7, philox.fnv1a32("w")))
        assert int(w[j]) == int(blk[i & 3])


def test_retention_mask_threshold():
    w = philox.retention_words(1000, 3, 1, "x", 0)
    assert torch.equal(philox.retention_mask(1000, 3, 1, "x", 0, 0.3),
                       w < philox.keep_threshold(0.3))
    assert bool(philox.retention_mask(10, 0, 1, "x", 0, 1.0).all())
    assert not bool(philox.retention_mask(10, 0, 1, "x", 0, 0.0).any())


@pytest.fixture
def cpp():
    require_backend("cpp", "cpu")
    from safepatch_merge.ops import cpp_backend

    return cpp_backend


def test_cpp_known_answer(cpp):
    # counter (0, 0, 0, 0), key (0, 0): block 0 of patch 0 with seed 0 and name hash 0
    got = torch.ops.safepatch.philox_words(0, 4, 0, 0, 0)
    assert [int(x) for x in got] == list(KAT[0][2])


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("patch_id", [0, 1, 2, 7, 0xFFFFFFFF])
def test_cpp_words_equal_reference(cpp, offset, patch_id):
    n = 1001  # odd: partial blocks and a partial SIMD group at both ends
    got = cpp.philox_words(offset, n, 12345 + (3 << 32), "model.layers.0.mlp.up_proj.weight", patch_id)
    want = philox.retention_words(n, offset, 12345 + (3 << 32), "model.layers.0.mlp.up_proj.weight",
                                  patch_id)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert torch.equal(got, want)


def test_cpp_words_chunking_invariant(cpp):
    whole = cpp.philox_words(5, 3000, 1, "t", 0)
    parts = [cpp.philox_words(5 + a, b - a, 1, "t", 0) for a, b in ((0, 1), (1, 999), (999, 3000))]
    assert torch.equal(torch.cat(parts), whole)


def test_cpp_words_rejects_bad_arguments(cpp):
    with pytest.raises(RuntimeError, match="offset and numel must be >= 0"):
        torch.ops.safepatch.philox_words(-1, 4, 0, 0, 0)
    for bad in (-1, 1 << 32):
        with pytest.raises(RuntimeError, match="patch_id must be a uint32"):
            torch.ops.safepatch.philox_words(0, 4, 0, 0, bad)
    with pytest.raises(RuntimeError, match="name_hash must be a uint32"):
        torch.ops.safepatch.philox_words(0, 4, 0, 1 << 32, 0)


def test_reference_stays_on_the_tensors_device():
    """Int counter words must follow the tensor words' device (a CUDA run once mixed CPU and CUDA
    tensors here). The meta device refuses CPU operands just like CUDA does, so it catches a
    mix on a machine without a GPU."""
    blk = torch.arange(5, dtype=torch.int64, device="meta")
    words = philox.philox4x32_10((blk, blk >> 32, 1, 0), (3, 4))
    assert all(w.device.type == "meta" and w.dtype == torch.int64 and w.shape == (5,) for w in words)
    assert philox.retention_words(10, 5, 1, "x", 1, device="meta").device.type == "meta"
    assert philox.retention_mask(10, 5, 1, "x", 1, 0.5, device="meta").dtype == torch.bool
    # ints only: CPU tensors; tensors on several devices: a clear error
    assert philox.philox4x32_10((1, 2, 3, 4), (5, 6))[0].device.type == "cpu"
    with pytest.raises(ValueError, match="several devices"):
        philox.philox4x32_10((blk, torch.zeros(5, dtype=torch.int64), 0, 0), (0, 0))


def test_reference_merge_stays_on_the_tensors_device():
    from safepatch_merge.ops import reference as ref

    base = torch.empty(37, dtype=torch.bfloat16, device="meta")
    score = torch.empty(37, device="meta")
    out, m_se, m_osm = ref.masked_merge(base, base, base, score, score, t_se=0.5, t_osm=0.5,
                                        mode="difference", alpha=1.0, beta=1.0, p=0.5,
                                        rescale=True, seed=1, name="w", offset=3,
                                        patches_are_deltas=True, out_dtype=torch.float16,
                                        return_masks=True)
    assert out.device.type == m_se.device.type == m_osm.device.type == "meta"
    assert out.dtype == torch.float16 and m_se.dtype == torch.bool and out.shape == (37,)
