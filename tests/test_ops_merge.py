"""masked_merge on every backend against the reference (masks identical, values within one ulp),
against an fp64 computation, chunked vs whole, retention statistics, argument errors."""
import math

import pytest
import torch

from op_cases import (FLOATS, MergeCase, assert_within_one_ulp, backend, merge_case,  # noqa: F401
                      reference_merge, run_merge, to, ulp)
from safepatch_merge import ops
from safepatch_merge.ops import reference as ref

SHAPE = (7, 429)  # 3003 elements: odd, not a multiple of any block
DTYPES = [  # (base, patch_se, patch_osm, scores, out)
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float16, torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float32, torch.float16, torch.float16, torch.float16),
    # one dtype for base, patches and out, one for both scores (the C++ single-pass kernel)
    (torch.float16, torch.float16, torch.float16, torch.bfloat16, torch.float16),
    (torch.float32, torch.float32, torch.float32, torch.float16, torch.float32),
]


def _case(dts, deltas, seed=0, shape=SHAPE):
    base_dt, se_dt, osm_dt, score_dt, _ = dts
    return merge_case(shape, seed, base_dt, se_dt, score_dt, deltas, osm_patch_dt=osm_dt)


def _thresholds(case, rate=0.3):
    """The exact top-`rate` thresholds of each score tensor (the reference's selection)."""
    from safepatch_merge.merge.select import select_thresholds

    sel = select_thresholds({"se": case.score_se, "osm": case.score_osm}, rate, "tensor",
                            hist_fn=ref.radix_histogram)
    return sel["se"].threshold, sel["osm"].threshold


def _check(got, want, what=""):
    assert torch.equal(got[1], want[1]), f"{what}: SE masks differ"
    assert torch.equal(got[2], want[2]), f"{what}: OSM masks differ"
    assert_within_one_ulp(got[0], want[0], f"{what}: merged values")


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("deltas", [True, False], ids=["deltas", "full"])
@pytest.mark.parametrize("dts", DTYPES, ids=["bf16", "mixed32", "fp16", "fp16-bf16s", "fp32-fp16s"])
def test_matches_reference(backend, mode, deltas, dts):
    case = _case(dts, deltas)
    t_se, t_osm = _thresholds(case)
    kw = dict(t_se=t_se, t_osm=t_osm, mode=mode, alpha=1.25, beta=0.75, p=0.6, rescale=True,
              seed=2024, name="model.layers.1.self_attn.q_proj.weight", offset=5,
              patches_are_deltas=deltas, out_dtype=dts[4])
    got, want = run_merge(backend, case, **kw)
    _check(got, want, f"{backend.name} {mode}")
    assert got[0].shape == SHAPE and got[1].dtype == torch.bool
    # rates strictly inside (0, 1): some elements patched, not all
    for m in got[1:]:
        assert 0 < int(m.sum()) < m.numel()
    if mode == "difference":
        assert not bool((got[1] & got[2]).any())
    if mode == "intersection":
        both = ref.selection_mask(case.score_se, t_se) & ref.selection_mask(case.score_osm, t_osm)
        assert not bool(((got[1] | got[2]) & ~both).any())


@pytest.mark.parametrize("deltas", [True, False], ids=["deltas", "full"])
def test_close_to_fp64(backend, deltas):
    case = merge_case(SHAPE, 11, torch.float32, torch.bfloat16, torch.float32, deltas)
    t_se, t_osm = _thresholds(case, 0.4)
    alpha, beta, p = 1.7, -0.9, 0.55
    for out_dtype in FLOATS:
        out, m_se, m_osm = run_merge(backend, case, t_se=t_se, t_osm=t_osm, alpha=alpha,
                                     beta=beta, p=p, rescale=True, seed=3, name="w",
                                     patches_are_deltas=deltas, out_dtype=out_dtype)[0]
        b = case.base.double()
        d_se, d_osm = case.patch_se.double(), case.patch_osm.double()
        if not deltas:
            d_se, d_osm = d_se - b, d_osm - b
        c_se, c_osm = alpha / p, beta / p
        t_se_ = torch.where(m_se, c_se * d_se, torch.zeros_like(b))
        t_osm_ = torch.where(m_osm, c_osm * d_osm, torch.zeros_like(b))
        exact = b + t_se_ + t_osm_
        fp32_err = 4 * 2.0 ** -24 * (b.abs() + t_se_.abs() + t_osm_.abs() + d_se.abs() + d_osm.abs())
        tol = 0.5 * ulp(torch.maximum(exact.abs(), out.double().abs()), out_dtype) + fp32_err
        err = (out.double() - exact).abs()
        assert bool((err <= tol).all()), f"{out_dtype}: max error {float((err - tol).max())} over bound"


def test_chunked_equals_whole(backend):
    case = merge_case((3001,), 5, torch.bfloat16, torch.bfloat16, torch.float32, deltas=False)
    t_se, t_osm = _thresholds(case, 0.25)
    kw = dict(t_se=t_se, t_osm=t_osm, mode="difference", alpha=1.0, beta=1.0, p=0.5,
              rescale=True, seed=9, name="emb", patches_are_deltas=False, return_masks=True)
    dev = backend.device
    whole = [t.cpu() for t in ops.masked_merge(*to(dev, *case), offset=0, **kw)]
    parts = []
    for a, b in ((0, 1), (1, 998), (998, 1003), (1003, 3001)):
        chunk = MergeCase(*(t[a:b] for t in case))
        parts.append([t.cpu() for t in ops.masked_merge(*to(dev, *chunk), offset=a, **kw)])
    for k in range(3):
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k]), f"output {k} differs"


@pytest.mark.parametrize("offset", [(1 << 32) - 3, (1 << 34) - 5, (1 << 40) + 1])
def test_large_offsets(backend, offset):
    # A chunk at a large offset gets the masks of the whole tensor's elements offset..: the
    # reference computes those from the element indices directly.
    case = merge_case((1001,), 8, torch.bfloat16, torch.bfloat16, torch.float32)
    t_se, t_osm = _thresholds(case, 0.5)
    kw = dict(t_se=t_se, t_osm=t_osm, mode="topk", p=0.3, seed=77, name="big", offset=offset)
    got, want = run_merge(backend, case, **kw)
    _check(got, want, f"offset {offset}")
    other, _ = run_merge(backend, case, **dict(kw, offset=offset + 4))
    assert not torch.equal(other[1], got[1])  # the offset really moves the stream


def test_retention_within_binomial_bounds(backend):
    n, p = 4000, 0.3
    case = merge_case((n,), 21, torch.float32, torch.float32, torch.float32)
    got, want = run_merge(backend, case, mode="none", p=p, seed=5, name="r")
    _check(got, want, "mode none")
    sigma = math.sqrt(n * p * (1 - p))
    for m in got[1:]:
        assert abs(int(m.sum()) - n * p) < 5 * sigma
    # SE and OSM draw from different streams
    assert not torch.equal(got[1], got[2])


def test_retention_extremes(backend):
    case = merge_case((1003,), 4)
    t_se, t_osm = _thresholds(case, 0.5)
    kw = dict(t_se=t_se, t_osm=t_osm, mode="topk", seed=1, name="x")
    got0, _ = run_merge(backend, case, p=0.0, **kw)
    assert not bool(got0[1].any() or got0[2].any())
    assert torch.equal(got0[0], case.base)
    got1, want1 = run_merge(backend, case, p=1.0, **kw)
    _check(got1, want1, "p=1")
    assert torch.equal(got1[1], ref.selection_mask(case.score_se, t_se))


def test_nothing_selected_keeps_base_bits(backend):
    base = torch.tensor([-0.0, 0.0, 1.5, -2.25, float("inf"), 3.0] * 50, dtype=torch.bfloat16)
    patch = torch.full_like(base, float("nan"))
    score = torch.ones(base.shape)
    for kw in (dict(t_se=math.inf, t_osm=math.inf), dict(t_se=0.5, t_osm=0.5, p=0.0)):
        out = ops.masked_merge(*to(backend.device, base, patch, patch, score, score), mode="topk",
                               **kw).cpu()
        assert torch.equal(out.view(torch.int16), base.view(torch.int16))  # -0 and all bits kept


def test_same_score_tensor_for_both_patches(backend):
    case = merge_case((999,), 6)
    case = case._replace(score_osm=case.score_se)
    got, want = run_merge(backend, case, t_se=0.7, t_osm=0.2, mode="topk")
    _check(got, want, "shared scores")
    assert int(got[2].sum()) > int(got[1].sum())


def test_single_patch_and_mode_none_without_scores(backend):
    case = merge_case((1001,), 7, deltas=False)
    got, want = run_merge(backend, case._replace(patch_osm=None, score_osm=None),
                          t_se=0.5, mode="difference", p=0.8, patches_are_deltas=False)
    _check(got, want, "SE only")
    assert not bool(got[2].any())
    no_scores = case._replace(score_se=None, score_osm=None)
    got, want = run_merge(backend, no_scores, mode="none", alpha=0.5, beta=2.0, p=0.5,
                          patches_are_deltas=False)
    _check(got, want, "mode none")


def test_without_masks_returns_the_tensor(backend):
    case = merge_case((513,), 3)
    out = ops.masked_merge(*to(backend.device, *case), t_se=0.5, t_osm=0.5, p=0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    want = reference_merge(case, t_se=0.5, t_osm=0.5, p=0.5, return_masks=False)
    assert_within_one_ulp(out.cpu(), want)


def test_zero_elements(backend):
    e = torch.empty(0, 3, dtype=torch.bfloat16)
    got = ops.masked_merge(*to(backend.device, e, e, e, e.float(), e.float()), t_se=0.5,
                           t_osm=0.5, p=0.5, return_masks=True)
    assert got.out.shape == (0, 3) and got.applied_se.shape == (0, 3)


# ---------------------------------------------------------------- retention before selection

def _masks_by_hand(case, t_se, t_osm, mode, p, seed, name, offset, order):
    """Applied masks from the definition (docs/design.md §1), with Philox words straight from the
    generator: T_X = S_X >= t_X and S_X > 0 (and R_X before selection), M_X by mode, applied
    R_X ⊙ M_X after selection, M_X before."""
    from safepatch_merge.ops.philox import keep_threshold, retention_words

    n = case.base.numel()
    kept = [retention_words(n, offset, seed, name, pid) < keep_threshold(p) for pid in (0, 1)]
    top = []
    for pid, (score, t) in enumerate(((case.score_se, t_se), (case.score_osm, t_osm))):
        k = ref.score_keys(score).reshape(-1)
        sel = (k >= ref.threshold_key(t)) & (k > 0)
        top.append(sel & kept[pid] if order == "before_selection" and mode != "none" else sel)
    if mode == "none":
        m = [torch.ones(n, dtype=torch.bool)] * 2
    elif mode == "difference":
        m = [top[0] & ~top[1], top[1] & ~top[0]]
    elif mode == "intersection":
        m = [top[0] & top[1]] * 2
    else:
        m = top
    if order == "after_selection" or mode == "none":
        m = [m[0] & kept[0], m[1] & kept[1]]
    return [x.reshape(case.base.shape) for x in m]


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("order", ref.RETENTION_ORDERS)
@pytest.mark.parametrize("dts", DTYPES[:1] + DTYPES[3:4], ids=["bf16", "fp16-bf16s"])
def test_retention_orders_match_definition(backend, mode, order, dts):
    case = _case(dts, deltas=False, seed=3)
    t_se, t_osm = _thresholds(case, 0.4)
    kw = dict(t_se=t_se, t_osm=t_osm, mode=mode, alpha=1.25, beta=0.75, p=0.55, rescale=True,
              seed=2**33 + 1, name="model.layers.2.mlp.down_proj.weight", offset=7,
              patches_are_deltas=False, out_dtype=dts[4], retention_order=order)
    counts = torch.zeros(2, dtype=torch.int64, device=backend.device)
    got, want = run_merge(backend, case, applied_counts=counts, **kw)
    _check(got, want, f"{backend.name} {mode} {order}")
    by_hand = _masks_by_hand(case, t_se, t_osm, mode, 0.55, 2**33 + 1,
                             "model.layers.2.mlp.down_proj.weight", 7, order)
    assert torch.equal(got[1], by_hand[0]) and torch.equal(got[2], by_hand[1])
    assert counts.cpu().tolist() == [int(got[1].sum()), int(got[2].sum())]
    assert 0 < int(got[1].sum()) < got[1].numel()
    if order == "before_selection" and mode == "difference":
        # overlap removed only where the other patch was retained: some elements in both
        # score top sets are patched by one side
        both = ref.selection_mask(case.score_se, t_se) & ref.selection_mask(case.score_osm, t_osm)
        assert bool((got[1] & both).any()) and bool((got[2] & both).any())
        assert not bool((got[1] & got[2]).any())


def test_orders_agree_without_draw_and_in_mode_none(backend):
    case = merge_case((1003,), 12)
    t_se, t_osm = _thresholds(case, 0.3)
    kw = dict(t_se=t_se, t_osm=t_osm, seed=4, name="w", offset=1, return_masks=True)
    for mode, p in (("difference", 1.0), ("topk", 1.0), ("none", 0.4)):
        a, b = (ops.masked_merge(*to(backend.device, *case), mode=mode, p=p, retention_order=o,
                                 **kw) for o in ref.RETENTION_ORDERS)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (mode, p)
    a, b = (ops.masked_merge(*to(backend.device, *case), mode="topk", p=0.4, retention_order=o,
                             **kw) for o in ref.RETENTION_ORDERS)
    assert torch.equal(a[1], b[1])  # topk: R ⊙ T either way, with the same thresholds
    a, b = (ops.masked_merge(*to(backend.device, *case), mode="difference", p=0.4,
                             retention_order=o, **kw) for o in ref.RETENTION_ORDERS)
    assert not torch.equal(a[1], b[1])  # difference: the overlap depends on the order


@pytest.mark.parametrize("order", ref.RETENTION_ORDERS)
def test_chunks_and_counts_equal_whole(backend, order):
    case = merge_case((3001,), 5, torch.bfloat16, torch.bfloat16, torch.float32, deltas=False)
    t_se, t_osm = _thresholds(case, 0.25)
    kw = dict(t_se=t_se, t_osm=t_osm, mode="difference", alpha=1.0, beta=1.0, p=0.5,
              rescale=True, seed=9, name="emb", patches_are_deltas=False, return_masks=True,
              retention_order=order)
    dev = backend.device
    total = torch.zeros(2, dtype=torch.int64, device=dev)
    whole = [t.cpu() for t in ops.masked_merge(*to(dev, *case), offset=0, applied_counts=total,
                                               **kw)]
    parts, summed = [], torch.zeros(2, dtype=torch.int64, device=dev)
    for a, b in ((0, 1), (1, 998), (998, 1003), (1003, 3001)):
        chunk = MergeCase(*(t[a:b] for t in case))
        parts.append([t.cpu() for t in ops.masked_merge(*to(dev, *chunk), offset=a,
                                                        applied_counts=summed, **kw)])
    for k in range(3):
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k]), f"output {k} differs"
    assert torch.equal(summed, total)
    assert total.cpu().tolist() == [int(whole[1].sum()), int(whole[2].sum())]


# ---------------------------------------------------------------- argument errors

def _bad(backend, match, **over):
    case = merge_case((64,), 1)
    args = dict(base=case.base, patch_se=case.patch_se, patch_osm=case.patch_osm,
                score_se=case.score_se, score_osm=case.score_osm)
    kw = dict(t_se=0.5, t_osm=0.5, p=0.5)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    args = {k: (v.to(backend.device) if isinstance(v, torch.Tensor) and v.layout == torch.strided
                else v) for k, v in args.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        ops.masked_merge(args["base"], args["patch_se"], args["patch_osm"], args["score_se"],
                         args["score_osm"], **kw)


def test_rejects_bad_arguments(backend):
    good = merge_case((64,), 1)
    _bad(backend, r"patch_se has shape \(63,\) but base has \(64,\)", patch_se=good.patch_se[:63])
    _bad(backend, r"score_osm has shape \(8, 8\)", score_osm=good.score_osm.reshape(8, 8))
    _bad(backend, "patch_osm has dtype int32", patch_osm=torch.zeros(64, dtype=torch.int32))
    _bad(backend, "base has dtype float64", base=good.base.double())
    _bad(backend, r"retention rate p must be in \[0, 1\], got 1.5", p=1.5)
    _bad(backend, r"retention rate p must be in \[0, 1\], got -0.1", p=-0.1)
    _bad(backend, "threshold t_se must be a number, got nan", t_se=float("nan"))
    _bad(backend, "threshold t_osm must be >= 0", t_osm=-1.0)
    # made on the device: .to() would return a contiguous copy of a strided view
    _bad(backend, "score_se must be contiguous",
         score_se=torch.rand(128, device=backend.device)[::2])
    _bad(backend, "patch_se has unsupported layout", patch_se=good.patch_se.to_sparse())
    _bad(backend, "score_osm is required for mode 'topk'", score_osm=None, mode="topk")
    _bad(backend, "mode must be one of", mode="union")
    _bad(backend, "alpha must be finite", alpha=float("inf"))
    _bad(backend, "rescale needs p > 0", p=0.0, rescale=True)
    _bad(backend, "offset must be a non-negative int", offset=-4)
    _bad(backend, "out_dtype must be float32, bfloat16 or float16", out_dtype=torch.float64)
    _bad(backend, "retention_order must be one of after_selection, before_selection",
         retention_order="before")
    _bad(backend, "applied_counts has dtype int32",
         applied_counts=torch.zeros(2, dtype=torch.int32, device=backend.device))
    _bad(backend, r"applied_counts must be an int64 tensor of shape \(2,\)",
         applied_counts=torch.zeros(3, dtype=torch.int64, device=backend.device))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cpp_op_checks_its_own_arguments(device):
    """Direct torch.ops.safepatch calls (bypassing the Python checks) fail with clear messages,
    on the CPU kernels and on the CUDA ones (skipped where those are not built)."""
    from op_cases import require_backend

    require_backend("cpp", device)
    b = torch.zeros(10, dtype=torch.bfloat16, device=device)
    s = torch.ones(10, device=device)
    mm = torch.ops.safepatch.masked_merge

    def call(**over):
        a = dict(base=b, patch_se=b, patch_osm=None, score_se=s, score_osm=None, key_se=0,
                 key_osm=0, mode=2, c_se=1.0, c_osm=1.0, keep_threshold=1 << 32, seed=0,
                 name_hash=0, offset=0, deltas=True, out_dtype=torch.bfloat16, return_masks=False)
        a.update(over)
        return mm(*a.values())

    assert torch.equal(call()[0], b + b)
    with pytest.raises(RuntimeError, match="key_se must be the key of a threshold"):
        call(key_se=0x7FC00000)  # NaN
    with pytest.raises(RuntimeError, match="keep_threshold must be floor"):
        call(keep_threshold=(1 << 32) + 1)
    with pytest.raises(RuntimeError, match="patch_se has 9 elements but base has 10"):
        call(patch_se=b[:9])
    with pytest.raises(RuntimeError, match="score_se must be contiguous"):
        call(score_se=torch.ones(20, device=device)[::2])
    if device == "cuda":  # a CPU operand dispatches to the CUDA kernel, which must refuse it
        with pytest.raises(RuntimeError, match="patch_se is on cpu but base is on cuda"):
            call(patch_se=b.cpu())
    with pytest.raises(RuntimeError, match="score_se is required"):
        call(score_se=None)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        call(mode=4)
    with pytest.raises(RuntimeError, match="base has dtype Double"):
        call(base=b.double())
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    out = mm(*dict(base=b, patch_se=torch.ones_like(b), patch_osm=None, score_se=s, score_osm=None, key_se=0,
                   key_osm=0, mode=2, c_se=1.0, c_osm=1.0, keep_threshold=1 << 31, seed=0,
                   name_hash=0, offset=0, deltas=True, out_dtype=torch.bfloat16,
                   return_masks=False, retain_first=True, applied_counts=counts).values())
    assert 0 < int(counts[0]) < 10 and int(counts[1]) == 0
    assert int((out[0] != b).sum()) == int(counts[0])
    with pytest.raises(RuntimeError, match="applied_counts must be a contiguous int64 tensor"):
        mm(b, b, None, s, None, 0, 0, 2, 1.0, 1.0, 1 << 32, 0, 0, 0, True, torch.bfloat16, False,
           False, torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="patch_id must be 0 .SE. or 1 .OSM."):
        torch.ops.safepatch.radix_histogram(s, 0, 0, 1 << 31, 0, 0, 2, 0)
    with pytest.raises(RuntimeError, match="digit must be 0 or 1, got 2"):
        torch.ops.safepatch.radix_histogram(s, 0, 2)
    with pytest.raises(RuntimeError, match="prefix must be in"):
        torch.ops.safepatch.radix_histogram(s, 65536, 1)
    with pytest.raises(RuntimeError, match="grad has 9 elements but score has 10"):
        torch.ops.safepatch.saliency_accumulate_(s.clone(), s, s[:9], 1.0)
