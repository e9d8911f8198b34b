"""Classic merges (task_arithmetic, ties, dare_linear, dare_ties): the streaming per-tensor
code against an independent whole-tensor implementation, chunking invariance, TIES's radix
trim, DARE's retained fraction and rescale."""
import math
from fractions import Fraction

import pytest
import torch
from classic_reference import reference_merge

from safepatch_merge.merge.classic.in_memory import merge_state_dicts
from safepatch_merge.merge.classic.spec import METHODS, default_params, get_method
from safepatch_merge.merge.classic.tensor_merge import TensorMerge
from safepatch_merge.merge.classic.trim import trim_count
from safepatch_merge.merge.select import KthLargest
from safepatch_merge.merge.classic.abs_sum import ExactAbsSum, l1_rescale_factor

SHAPES = {"a.weight": (37, 53), "b.bias": (101,), "c.weight": (7, 3, 11)}


def _inputs(dtype, n_models=3, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    models = [{k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype)
               for k, v in base.items()} for _ in range(n_models)]
    return base, models


CASES = [
    # method, weights, densities, normalize, rescale, lambda
    ("task_arithmetic", [0.5, 0.3, 0.7], None, None, None, 1.0),
    ("task_arithmetic", [0.5, -0.3, 0.7], None, True, None, 0.8),
    ("ties", [0.5, 0.3, 0.7], [0.3, 0.5, 0.11], None, None, 1.0),
    ("ties", [1.0, 1.0, -0.4], [0.2, 1.0, 0.0], False, True, 1.3),
    ("dare_ties", [0.5, 0.3, 0.7], [0.3, 0.5, 0.9], None, None, 1.0),
    ("dare_ties", [0.5, 0.3, 0.7], [0.3, 0.0, 1.0], True, False, 0.5),
    ("dare_linear", [0.5, 0.3, 0.7], [0.3, 0.5, 0.9], None, None, 1.0),
    ("dare_linear", [0.2, 0.3, 0.5], [0.6, 0.5, 0.4], True, True, 2.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[4]}-{c[5]}")
def test_matches_independent_reference(case, dtype):
    method, weights, dens, normalize, rescale, lam = case
    base, models = _inputs(dtype)
    p = default_params(method, weights, dens, normalize=normalize, rescale=rescale, lam=lam)
    ours = merge_state_dicts(method, base, models, p, seed=11)
    chunked = merge_state_dicts(method, base, models, p, seed=11, chunk_elems=257)
    for name in base:
        ref = reference_merge(method, name, base[name], [m[name] for m in models],
                              list(p.weights), list(p.densities), normalize=p.normalize,
                              rescale=p.rescale, lam=p.lam, seed=11)
        assert ours[name].dtype == dtype
        # same arithmetic in the same order: identical values (random data has no ties at
        # the trim threshold); the rescale factor may differ in its last bit (exact vs
        # float64 sums), hence one fp32 ulp of slack when rescaling.
        # same arithmetic in the same order: identical values. The L1 rescale factor may
        # differ in its last bit (exact vs float64 sums): one fp32 ulp of slack there.
        if p.rescale and method != "task_arithmetic":
            torch.testing.assert_close(ours[name].float(), ref.float(), rtol=3e-7, atol=1e-7)
        else:
            assert torch.equal(ours[name], ref), name
        assert torch.equal(ours[name], chunked[name]), f"{name}: chunking changed bits"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_equals_stable_argsort_trim(dtype):
    """Exactly k kept, ties at the threshold by element index: the reference's stable argsort
    gives the same bits, also where bf16 deltas tie at the threshold beyond k."""
    base, models = _inputs(dtype, seed=5)
    p = default_params("ties", [0.5, 0.3, 0.7], [0.3, 0.5, 0.11])
    ours = merge_state_dicts("ties", base, models, p)
    overflow = 0
    for name in base:
        xs = [m[name] for m in models]
        ref = reference_merge("ties", name, base[name], xs, list(p.weights), list(p.densities),
                              normalize=True, rescale=False)
        overflow += _ties_overflow(base[name], xs, p.densities)
        assert torch.equal(ours[name], ref), name
    if dtype == torch.bfloat16:
        assert overflow > 0  # the tie cutoff was exercised
    else:
        assert overflow == 0  # continuous random deltas: no ties


def _ties_overflow(base, xs, densities):
    """How many models' |delta| have more entries >= their k-th largest than k."""
    count = 0
    for x, dens in zip(xs, densities):
        k = trim_count(dens, base.numel())
        if not k:
            continue
        ad = (x.float() - base.float()).abs()
        t = torch.sort(ad.reshape(-1), descending=True).values[k - 1]
        count += int((ad >= t).sum()) > k
    return count


def test_defaults_are_mergekits():
    assert [(m.name, m.default_normalize, m.default_rescale, m.sparsify, m.consensus)
            for m in METHODS.values()] == [
        ("task_arithmetic", False, False, None, False),
        ("ties", True, False, "magnitude", True),
        ("dare_ties", False, True, "random", True),
        ("dare_linear", False, True, "random", False),
    ]
    p = default_params("ties", [1.0, 2.0])
    assert (p.densities, p.normalize, p.rescale, p.lam) == ((1.0, 1.0), True, False, 1.0)


def test_trim_count_is_mergekits_truncation():
    # mergekit: k = max(1, int(density * N)) in binary64 — 0.29 * 100 = 28.999... -> 28.
    assert trim_count(0.29, 100) == 28
    assert trim_count(0.07, 100) == 7
    assert trim_count(0.001, 10) == 1  # positive density keeps at least one
    assert trim_count(0.0, 10) == 0
    assert trim_count(1.0, 10) is None
    assert trim_count(0.5, 0) == 0


@pytest.mark.parametrize("n,k", [(1, 1), (1000, 1), (1000, 100), (4099, 4099), (5000, 2500)])
def test_kth_largest_is_exact_in_any_chunking(n, k):
    g = torch.Generator().manual_seed(n + k)
    v = torch.randn(n, generator=g).abs() * torch.exp(torch.randn(n, generator=g) * 5)
    v[::7] = 0.0
    want = float(torch.sort(v, descending=True).values[k - 1])
    for chunk in (n, 997, 97) if n > 1 else (1,):
        kth = KthLargest(k)
        while kth.pending:
            for s in range(0, n, chunk):
                kth.add(v[s:s + chunk].contiguous())
            kth.next_stage()
        assert kth.threshold == want


def test_ties_keeps_exactly_k_with_ties_in_index_order():
    base = torch.zeros(10)
    x = torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.5, 0.0, 0.0, -0.1, 0.2])
    p = default_params("ties", [1.0], [0.2], normalize=False)  # k = 2: threshold |d| = 2
    tm = TensorMerge(get_method("ties"), p, "t", 10)
    out = tm.merge_whole(base, [x])
    assert out.tolist() == [3.0, -2.0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert tm.kept() == [2]
    p = default_params("ties", [1.0], [0.3], normalize=False)  # k = 3
    assert TensorMerge(get_method("ties"), p, "t", 10).merge_whole(base, [x]).tolist() == \
        [3.0, -2.0, 2.0, 0, 0, 0, 0, 0, 0, 0]
    p = default_params("ties", [1.0], [0.9], normalize=False)  # k = 9 > 8 non-zero deltas
    tm = TensorMerge(get_method("ties"), p, "t", 10)
    assert torch.equal(tm.merge_whole(base, [x]), x)
    assert tm.kept() == [8]  # zero deltas are never kept (they would add nothing)


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([-3.0, -1.0, 1.0, 0.0]),
          torch.tensor([1.0, 4.0, -1.0, 0.0])]
    p = default_params("ties", [1.0, 1.0, 1.0])  # density 1: no trim; normalize
    out = TensorMerge(get_method("ties"), p, "t", 4).merge_whole(base, xs)
    # elem0: sum -1 -> negative elected -> only -3 (weight 1) -> -3
    # elem1: sum 2 -> positive -> only 4 -> 4;  elem2: sum 2 -> {2, 1} -> mean 1.5
    # elem3: all zero: nothing agrees, divisor 0 -> 1, stays 0
    assert out.tolist() == [-3.0, 4.0, 1.5, 0.0]


def test_task_arithmetic_weights_lambda_normalize():
    base = torch.tensor([1.0, 2.0])
    xs = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 6.0])]
    p = default_params("task_arithmetic", [0.5, 0.25], lam=2.0)
    out = TensorMerge(get_method("task_arithmetic"), p, "t", 2).merge_whole(base, xs)
    assert out.tolist() == [1.0 + 2 * 0.5, 2.0 + 2 * 1.0]
    p = default_params("task_arithmetic", [0.5, 0.25], normalize=True)
    out = TensorMerge(get_method("task_arithmetic"), p, "t", 2).merge_whole(base, xs)
    assert torch.equal(out, base + torch.tensor([0.5, 1.0]) / torch.tensor(0.75))
    p = default_params("task_arithmetic", [0.5, -0.5], normalize=True)  # |Σw| < 1e-8 -> 1
    out = TensorMerge(get_method("task_arithmetic"), p, "t", 2).merge_whole(base, xs)
    assert out.tolist() == [1.5, 0.0]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_retained_fraction_within_binomial_bounds(density):
    n = 200_003
    base = torch.zeros(n)
    xs = [torch.full((n,), 2.0), torch.full((n,), 2.0)]
    p = default_params("dare_linear", [1.0, 1.0], [density, density], rescale=False)
    tm = TensorMerge(get_method("dare_linear"), p, "model.layers.0.mlp.up_proj.weight", n, 7)
    out = tm.merge_whole(base, xs)
    both, one = int((out == 4.0).sum()), int((out == 2.0).sum())
    assert both + one + int((out == 0.0).sum()) == n
    sd = math.sqrt(n * density * (1 - density))
    import safepatch_merge.ops as ops
    for pid in (0, 1):  # each model keeps ~ Binomial(n, density)
        k = int(ops.retention_mask(n, 0, 7, tm.name, pid, density).sum())
        assert abs(k - n * density) < 5 * sd, (pid, k)
    assert abs((2 * both + one) / 2 - n * density) < 5 * sd
    # both kept ~ n·d², exactly one ~ 2n·d(1−d): independent streams per patch id
    assert abs(both - n * density ** 2) < 5 * math.sqrt(n * density ** 2 * (1 - density ** 2))
    q = 2 * density * (1 - density)
    assert abs(one - n * q) < 5 * math.sqrt(n * q * (1 - q))


def test_dare_rescale_is_l1_ratio_and_density_edges():
    g = torch.Generator().manual_seed(3)
    n = 10_000
    base = torch.randn(n, generator=g)
    x = base + torch.randn(n, generator=g) * 0.1
    spec = get_method("dare_linear")
    out = TensorMerge(spec, default_params(spec, [1.0], [0.3]), "w", n, 1).merge_whole(base, [x])
    d, kept = x - base, (out != base)
    factor = float(d.double().abs().sum() / d[kept].double().abs().sum())
    torch.testing.assert_close(out[kept] - base[kept], d[kept] * factor, rtol=1e-5, atol=1e-6)
    assert 0.27 < kept.float().mean() < 0.33
    # density 1: no drop and no rescale (mergekit returns the delta untouched)
    out = TensorMerge(spec, default_params(spec, [1.0], [1.0]), "w", n, 1).merge_whole(base, [x])
    assert torch.equal(out, base + (x - base))
    # density 0: nothing kept
    out = TensorMerge(spec, default_params(spec, [1.0], [0.0]), "w", n, 1).merge_whole(base, [x])
    assert torch.equal(out, base)


def test_dare_identical_across_chunkings_seeds_differ():
    base, models = _inputs(torch.bfloat16, n_models=2, seed=4)
    p = default_params("dare_ties", [0.7, 0.6], [0.4, 0.6])
    whole = merge_state_dicts("dare_ties", base, models, p, seed=9)
    for chunk in (1, 64, 1000):
        other = merge_state_dicts("dare_ties", base, models, p, seed=9, chunk_elems=chunk)
        assert all(torch.equal(whole[k], other[k]) for k in base)
    reseeded = merge_state_dicts("dare_ties", base, models, p, seed=10)
    assert not all(torch.equal(whole[k], reseeded[k]) for k in base)


def test_exact_abs_sum_is_exact_and_order_free():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.exp(torch.randn(5000, generator=g) * 20)
    x[:3] = torch.tensor([1e-45, -0.0, 3e38])  # a denormal, a negative zero, a huge value
    want = sum(Fraction(v) for v in x.abs().tolist())
    a = ExactAbsSum()
    a.add(x)
    b = ExactAbsSum()
    for s in reversed(range(0, 5000, 333)):
        b.add(x[s:s + 333])
    assert a.value() == want and b.value() == want
    assert l1_rescale_factor(Fraction(1, 10**8), Fraction(1)) == 1.0  # below eps: unscaled
    assert l1_rescale_factor(Fraction(3), Fraction(2)) == 1.5


def test_nonfinite_delta_is_an_error_naming_tensor_and_model():
    from safepatch_merge.errors import CheckpointError

    base = torch.zeros(8)
    x = torch.ones(8)
    x[3] = float("nan")
    tm = TensorMerge(get_method("ties"), default_params("ties", [1.0], [0.5]), "blk.w", 8,
                     model_labels=["model_0 ./ft"])
    with pytest.raises(CheckpointError, match=r"'blk.w' of model_0 ./ft: NaN"):
        tm.merge_whole(base, [x])
