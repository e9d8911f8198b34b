"""TIES's magnitude trim keeps exactly mergekit's k entries per tensor, ties at the threshold in
element-index order, whatever the chunking, the chunk order and the kernel (eager torch, C++
loops, the torch.compile graph); the exact selector and its tie cutoff on their own."""
import pytest
import torch
from classic_reference import magnitude_mask, reference_merge

from safepatch_merge.merge.classic.in_memory import merge_state_dicts
from safepatch_merge.merge.classic.spec import default_params, get_method
from safepatch_merge.merge.classic.tensor_merge import TensorMerge
from safepatch_merge.merge.classic.trim import trim_count
from safepatch_merge.merge.classic import combine, cpu_kernels, fused
from safepatch_merge.merge.classic.terms import KEEP_ALL, KEEP_TRIM, Term
from safepatch_merge.merge.select import (EXACTLY_K, KEEP_TIES, KthLargest, TieCutoff,
                                          TIE_BLOCK)


def _tied_values(n, seed, levels=7):
    """Non-negative fp32 values with heavy ties (a few levels) and some zeros."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, levels, (n,), generator=g).float() * 0.25
    v[torch.randint(0, n, (n // 10,), generator=g)] = 0.0
    return v


def _select(v, k, ties, chunks):
    sel = KthLargest(k, ties)
    while sel.pending:
        for s, e in chunks:
            sel.add(v[s:e].contiguous())
        sel.next_stage()
    return sel


def _stable_topk(v, k):
    order = torch.argsort(v, descending=True, stable=True)
    m = torch.zeros(v.numel(), dtype=torch.bool)
    m[order[:k]] = True
    return m & (v > 0)


@pytest.mark.parametrize("n,k", [(1000, 1), (1000, 137), (5000, 2500), (4099, 4000)])
@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_exactly_k_cutoff_equals_stable_sort_in_any_chunking(n, k, order):
    v = _tied_values(n, n + k)
    want = _stable_topk(v, k)
    for size in (n, 997, 61):
        chunks = [(s, min(s + size, n)) for s in range(0, n, size)]
        if order == "reversed":
            chunks = chunks[::-1]
        elif order == "shuffled":
            perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(size))
            chunks = [chunks[i] for i in perm]
        sel = _select(v, k, EXACTLY_K, chunks)
        t = sel.threshold
        assert sel.above == int((v > t).sum()) and sel.at == int((v == t).sum())
        cutoff = n
        if sel.ties_overflow:
            tc = TieCutoff(sel.tie_quota, sel.at)
            passes = 0
            while tc.pending:
                for s, e in chunks:
                    if tc.wants(s):
                        tc.observe(s, e - s, lambda a, b, s=s: v[s + a:s + b] == t)
                tc.end_pass()
                passes += 1
            assert passes == (1 if order == "in order" or len(chunks) == 1 else passes)
            assert passes <= 2
            cutoff = tc.cutoff
        idx = torch.arange(n)
        got = ((v > t) | ((v == t) & (idx < cutoff))) & (v > 0)
        assert torch.equal(got, want), (size, order)
        assert int(got.sum()) == sel.selected == min(k, int((v > 0).sum()))


def test_keep_ties_selects_every_tie_and_k_zero_selects_nothing():
    v = _tied_values(3000, 1)
    sel = _select(v, 500, KEEP_TIES, [(0, 3000)])
    assert sel.selected == int(((v >= sel.threshold) & (v > 0)).sum()) > 500
    assert not sel.ties_overflow
    none = KthLargest(0)
    assert not none.pending and none.threshold == float("inf") and none.selected == 0


def test_tie_cutoff_scans_in_blocks_and_needs_every_chunk():
    n = TIE_BLOCK + 5000
    flags = torch.zeros(n, dtype=torch.bool)
    flags[::3] = True
    total = int(flags.sum())
    quota = total - 7  # the cutoff falls in the second block
    tc = TieCutoff(quota, total)
    tc.observe(0, n, lambda a, b: flags[a:b])
    tc.end_pass()
    assert not tc.pending
    assert int(flags[:tc.cutoff].sum()) == quota and flags[tc.cutoff - 1]
    tc = TieCutoff(3, 10)
    tc.observe(100, 50, lambda a, b: flags[a:b])  # out of order; index 0.. never fed
    with pytest.raises(RuntimeError, match="fewer than the 3 needed"):
        tc.end_pass()


def _bf16_inputs(shapes, n_models, seed):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    models = [{k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).bfloat16()
               for k, v in base.items()} for _ in range(n_models)]
    return base, models


SHAPES = {"w": (61, 67), "v": (1000,), "e": (3, 5)}


@pytest.mark.parametrize("rescale", [False, True])
def test_kept_counts_are_exactly_k_in_any_chunking(rescale):
    base, models = _bf16_inputs(SHAPES, 2, 3)
    p = default_params("ties", [0.7, 0.4], [0.3, 0.55], rescale=rescale)
    whole = merge_state_dicts("ties", base, models, p)
    overflow = 0
    for name, b in base.items():
        xs = [m[name] for m in models]
        tm = TensorMerge(get_method("ties"), p, name, b.numel())
        tm.merge_whole(b, xs)
        for m, x, dens in zip(tm.models, xs, p.densities):
            d = x.float() - b.float()
            k = trim_count(dens, b.numel())
            assert tm.kept()[m.index] == k == int((d.reshape(-1) * magnitude_mask(d, dens)
                                                   != 0).sum())
            overflow += m.cutoff is not None
        ref = reference_merge("ties", name, b, xs, list(p.weights), list(p.densities),
                              normalize=p.normalize, rescale=rescale)
        if rescale:  # L1 factor: exact vs float64 sums
            torch.testing.assert_close(whole[name].float(), ref.float(), rtol=0.0079, atol=1e-6)
        else:
            assert torch.equal(whole[name], ref), name
    assert overflow >= 2  # bf16 deltas tie at the threshold beyond k
    for chunk in (997, 200, 7):  # merge_state_dicts feeds chunks in reverse order
        other = merge_state_dicts("ties", base, models, p, chunk_elems=chunk)
        for name in base:
            assert torch.equal(other[name], whole[name]), (chunk, name)


def test_cpp_and_compiled_graph_equal_eager_with_a_tie_cutoff(monkeypatch):
    """A chunk whose tie cutoff falls inside it (and across the C++ loop's 2048-element
    blocks), one before it, one after it: every kernel keeps the same entries."""
    g = torch.Generator().manual_seed(7)
    n = 9000
    base = torch.zeros(n)
    x = (torch.randint(-3, 4, (n,), generator=g).float() * 0.5).bfloat16()
    y = (torch.randn(n, generator=g) * 0.5).bfloat16()
    ad = x.float().abs()
    t = 1.0
    for offset, cut in [(0, 4321), (5000, 4321), (0, 0), (0, n), (0, 2048)]:
        terms = [Term(0.6, KEEP_TRIM, t, cutoff=offset + cut), Term(0.4, KEEP_ALL)]
        kw = dict(consensus=True, normalize=True, lam=1.0, out_dtype=torch.bfloat16)
        monkeypatch.setenv("SAFEPATCH_CLASSIC_COMPILE", "0")
        eager = combine.combine_chunk(base, [x, y], terms, offset=offset, **kw)
        keep = (ad > t) | ((ad == t) & (torch.arange(n) < cut))
        want = combine.combine_chunk(base, [x.float() * keep, y], [Term(0.6), Term(0.4)], **kw)
        assert torch.equal(eager, want), cut
        monkeypatch.setenv("SAFEPATCH_CLASSIC_COMPILE", "1")
        assert cpu_kernels.load() is not None, "the C++ kernels did not build"
        cpp = combine.combine_chunk(base, [x, y], terms, offset=offset, **kw)
        assert torch.equal(cpp, eager), cut
        # the torch.compile graph (used off CPU), run as plain torch: the same operations
        monkeypatch.setattr(fused, "_cpu", lambda t: None)
        monkeypatch.setattr(fused, "_compiled", lambda key, build: build())
        graph = combine.combine_chunk(base, [x, y], terms, offset=offset, **kw)
        monkeypatch.undo()
        assert torch.equal(graph, eager), cut
