"""Exact top-k thresholds from radix histograms (select.py) against sorting, on every backend."""
import math

import pytest
import torch

from op_cases import FLOATS, backend, rand_scores  # noqa: F401
from safepatch_merge import ops
from safepatch_merge.ops import reference as ref
from safepatch_merge.merge.select import (InvalidScoresError, Selection, ThresholdPlan, group_of,
                                    key_to_float, select_thresholds, top_k_count)


def sorted_selection(tensors, rate) -> Selection:
    """The expected Selection by sorting the fp32 keys of all scores in the group."""
    keys = torch.cat([ref.score_keys(t).reshape(-1) for t in tensors])
    n = keys.numel()
    k = top_k_count(rate, n)
    if k == 0:
        return Selection(math.inf, 0, n, 0)
    kth = int(torch.sort(keys, descending=True).values[k - 1])
    selected = int(((keys >= kth) & (keys > 0)).sum())
    return Selection(key_to_float(kth), k, n, selected)


def _on(backend, scores):
    return {name: t.to(backend.device) for name, t in scores.items()}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rate", [0.013, 0.3, 0.85])
def test_global_threshold_equals_sorting(backend, dtype, rate):
    scores = {f"t{i}": rand_scores((n,), dtype, 100 + i) for i, n in enumerate((1001, 17, 2500, 1))}
    got = select_thresholds(_on(backend, scores), rate)
    want = sorted_selection(list(scores.values()), rate)
    assert got == {"*": want}


def test_mixed_dtypes_and_fp32_refinement(backend):
    scores = {"a": rand_scores((999,), torch.float32, 1), "b": rand_scores((777,), torch.bfloat16, 2),
              "c": rand_scores((555,), torch.float16, 3)}
    for rate in (0.01, 0.5, 0.99):
        assert select_thresholds(_on(backend, scores), rate)["*"] == \
            sorted_selection(list(scores.values()), rate)


def test_k_equals_1_and_n(backend):
    s = {"w": rand_scores((1000,), torch.float32, 5)}
    one = select_thresholds(_on(backend, s), 1e-9)["*"]
    assert one.k == 1 and one.threshold == float(s["w"].max()) and one.selected == 1
    all_ = select_thresholds(_on(backend, s), 1.0)["*"]
    assert all_ == sorted_selection([s["w"]], 1.0)
    assert all_.k == 1000 and all_.threshold == 0.0  # the smallest score is a zero
    assert all_.selected == int((s["w"] > 0).sum())  # zeros never selected


def test_rate_007_on_100_elements_gives_7(backend):
    assert top_k_count(0.07, 100) == 7
    s = {"w": torch.randperm(100, generator=torch.Generator().manual_seed(0)).float() + 1}
    sel = select_thresholds(_on(backend, s), 0.07)["*"]
    assert (sel.k, sel.selected, sel.threshold) == (7, 7, 94.0)


def test_rate_zero_selects_nothing(backend):
    s = {"w": rand_scores((300,), torch.float32, 6)}
    sel = select_thresholds(_on(backend, s), 0.0)["*"]
    assert sel == Selection(math.inf, 0, 300, 0)
    assert not bool(ref.selection_mask(s["w"], sel.threshold).any())


def test_all_zero_scores(backend):
    s = {"w": torch.zeros(64), "v": torch.full((5,), -0.0)}
    sel = select_thresholds(_on(backend, s), 0.5)["*"]
    assert (sel.threshold, sel.k, sel.n, sel.selected) == (0.0, 35, 69, 0)


def test_selection_mask_agrees_with_selected_count(backend):
    s = {"w": rand_scores((2001,), torch.float16, 7)}
    sel = select_thresholds(_on(backend, s), 0.4)["*"]
    mask = ref.selection_mask(s["w"], sel.threshold)
    assert int(mask.sum()) == sel.selected >= sel.k - int((s["w"] == 0).sum())


def test_layer_and_tensor_granularity(backend):
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight"]
    scores = {nm: rand_scores((300 + 37 * i,), torch.float32, 50 + i) for i, nm in enumerate(names)}
    assert group_of(names[0], "layer") == "model.layers.0" == group_of(names[1], "layer")
    assert group_of(names[3], "layer") == names[3]
    assert group_of(names[0], "global") == "*" and group_of(names[0], "tensor") == names[0]
    with pytest.raises(ValueError, match="granularity must be one of"):
        group_of(names[0], "row")
    for gran in ("layer", "tensor"):
        got = select_thresholds(_on(backend, scores), 0.2, gran)
        groups = {}
        for nm in names:
            groups.setdefault(group_of(nm, gran), []).append(scores[nm])
        assert got == {g: sorted_selection(ts, 0.2) for g, ts in groups.items()}
    assert len(select_thresholds(_on(backend, scores), 0.2, "layer")) == 4


@pytest.mark.parametrize("bad,what", [(-1.0, "1 negative"), (float("nan"), "1 NaN/inf"),
                                      (float("inf"), "1 NaN/inf"), (-float("inf"), "1 negative")])
def test_invalid_scores_name_the_tensor(backend, bad, what):
    s = rand_scores((100,), torch.float32, 9)
    s[17] = bad
    scores = {"model.layers.3.mlp.down_proj.weight": s, "ok": rand_scores((10,), torch.float32, 1)}
    with pytest.raises(InvalidScoresError,
                       match=rf"scores of tensor 'model\.layers\.3\.mlp\.down_proj\.weight' contain {what}"):
        select_thresholds(_on(backend, scores), 0.5)


def test_minus_zero_is_not_invalid(backend):
    s = {"w": torch.tensor([-0.0, 1.0, 2.0])}
    assert select_thresholds(_on(backend, s), 1.0)["*"] == Selection(0.0, 3, 3, 2)


def test_top_k_count_rejects_bad_rates():
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="top rate must be in"):
            top_k_count(bad, 10)


def test_streaming_plan_over_chunks_equals_in_memory(backend):
    """ThresholdPlan fed chunk histograms (as the merge engine streams them) == select_thresholds."""
    scores = {"model.layers.0.a": rand_scores((2003,), torch.float32, 11),
              "model.layers.0.b": rand_scores((998,), torch.float16, 12),
              "model.layers.1.a": rand_scores((1500,), torch.float32, 13)}
    dev = backend.device
    chunks = {nm: [t[a:a + 700] for a in range(0, t.numel(), 700)] for nm, t in scores.items()}
    for gran in ("global", "layer"):
        groups = {}
        for nm in scores:
            groups.setdefault(group_of(nm, gran), []).append(nm)
        hist0 = {nm: sum(ops.radix_histogram(c.to(dev), 0, 0).cpu() for c in chunks[nm])
                 for nm in scores}
        for nm in scores:  # chunk histograms add up to the whole tensor's
            assert torch.equal(hist0[nm], ref.radix_histogram(scores[nm]))
        plan = ThresholdPlan(0.3, groups, hist0)
        for g, prefix in plan.pending().items():
            for nm in groups[g]:
                for c in chunks[nm]:
                    plan.add_refinement(g, ops.radix_histogram(c.to(dev), prefix, 1))
        assert plan.result() == select_thresholds(_on(backend, scores), 0.3, gran)
        assert plan.result() == {g: sorted_selection([scores[n] for n in nms], 0.3)
                                 for g, nms in groups.items()}


def test_plan_without_refinement_is_an_error():
    scores = {"a": rand_scores((100,), torch.float32, 1)}
    plan = ThresholdPlan(0.5, {"*": ["a"]}, {"a": ref.radix_histogram(scores["a"])})
    assert plan.pending()
    with pytest.raises(RuntimeError, match="refinement histogram of group '\\*' is incomplete"):
        plan.result()


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.7])
def test_retained_thresholds_equal_sorting(backend, rate):
    """Retention before selection: the k-th largest of the retained keys (dropped elements as
    key 0), k from all N elements; above p the group falls short and t = 0."""
    from safepatch_merge.ops.philox import keep_threshold, retention_words
    from safepatch_merge.merge.select import Retention

    scores = {f"model.layers.{i}.w": rand_scores((n,), dt, 20 + i)
              for i, (n, dt) in enumerate(((1001, torch.float32), (777, torch.bfloat16),
                                            (1500, torch.float16)))}
    ret = Retention("before_selection", 0.5, 3)
    for pid in (0, 1):
        retained = {}
        for name, t in scores.items():
            keys = ref.score_keys(t).reshape(-1)
            kept = retention_words(keys.numel(), 0, 3, name, pid) < keep_threshold(0.5)
            retained[name] = torch.where(kept, keys, torch.zeros_like(keys)).to(torch.int32) \
                .view(torch.float32)
        for gran in ("global", "layer"):
            got = select_thresholds(_on(backend, scores), rate, gran, retention=ret, patch_id=pid)
            groups = {}
            for nm in scores:
                groups.setdefault(group_of(nm, gran), []).append(retained[nm])
            want = {g: sorted_selection(ts, rate) for g, ts in groups.items()}
            assert got == want
            for s in got.values():
                assert (s.shortfall > 0) == (s.threshold == 0.0) == (rate > 0.5)
    # after selection (or p = 1) the plain thresholds
    plain = select_thresholds(_on(backend, scores), rate)
    assert select_thresholds(_on(backend, scores), rate, retention=Retention(p=0.5)) == plain
    assert select_thresholds(_on(backend, scores), rate,
                             retention=Retention("before_selection", 1.0, 3)) == plain
