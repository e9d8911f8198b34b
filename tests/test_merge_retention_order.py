"""Retention before selection (docs/design.md §1) through the streaming engine, against an independent
brute-force merge (tests/retention_brute_force.py): every mask mode × granularity × backend,
chunkings and memory budgets, the shortfall case (a > p), validation over all elements,
threshold caches keyed by the retention, the reported densities and the dry-run plan."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import retention_brute_force as brute
from merge_helpers import build_inputs, dir_bytes, load_dir, write_config, write_scores
from op_cases import require_backend
from safepatch_merge import ops
from safepatch_merge.errors import CheckpointError
from safepatch_merge.merge import merge

BEFORE = {"top_rate_se": 0.3, "top_rate_osm": 0.2, "retention": 0.6, "rescale": True,
          "alpha": 0.8, "beta": 1.5, "seed": 7, "retention_order": "before_selection"}
MODES = ("difference", "intersection", "topk", "none")
GRANULARITIES = ("global", "layer", "tensor")
# The Triton interpreter costs ~0.1-0.5 s per kernel launch: it merges fewer tensors (one
# block and both tensors outside blocks; still several groups at every granularity) in whole
# tensors (its chunk offsets are checked op by op in test_ops_merge / test_ops_histogram).
TRITON_INCLUDE = ["model.layers.1.*", "model.embed_tokens.weight", "lm_head.weight"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("retention_inputs"))


@pytest.fixture(autouse=True)
def automatic_backend():
    """merge(backend=...) forces the backend for the whole process: later tests get the
    automatic choice back (not, say, the Triton interpreter)."""
    yield
    ops.set_backend(None)


def assert_bits_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for n, t in want.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape, n
        bits = torch.int16 if t.element_size() == 2 else torch.int32
        assert torch.equal(got[n].contiguous().view(bits), t.contiguous().view(bits)), n


def assert_summary_matches(summary: dict, stats: dict, mode: str) -> None:
    """Selected and applied counts per patch and group, as the brute force counts them."""
    for side, groups in stats.items():
        applied = summary["applied"][side]["groups"]
        assert set(applied) == set(groups)
        for g, st in groups.items():
            assert applied[g]["applied"] == st["applied"], (side, g)
            if mode == "none":
                assert applied[g]["n"] == st["n"]
                continue
            sel = summary["selection"][side]["groups"][g]
            assert (sel["k"], sel["n"], sel["selected"]) == (st["k"], st["n"], st["selected"])
            assert applied[g]["n"] == st["n"]
            assert sel["shortfall"] == max(0, st["k"] - st["selected"])


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_equals_brute_force(inputs, tmp_path, monkeypatch, backend, mode, granularity):
    require_backend(backend, "cpu")
    include = TRITON_INCLUDE if backend == "triton" else None
    if backend != "triton":
        monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "1000")  # several chunks per tensor
    params = {**BEFORE, "mask_mode": mode, "granularity": granularity}
    cfg = write_config(tmp_path / "c.yaml", inputs, params, include=include,
                       output={"max_shard_size": "30KB"})
    res = merge(cfg, tmp_path / "out", backend=backend,
                max_memory=None if backend == "triton" else "1MB")
    want, stats = brute.merge(inputs, params, include=include)
    assert_bits_equal(load_dir(tmp_path / "out"), want)
    assert_summary_matches(res.summary, stats, mode)
    base = load_dir(inputs["base"])
    assert sum(int((want[n] != base[n]).sum()) for n in base) > 0
    prov = json.loads((tmp_path / "out" / "safepatch_provenance.json").read_text())
    assert prov["result"]["parameters"]["retention_order"] == "before_selection"
    assert "| retention_order | before_selection |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("mode", MODES)
def test_after_selection_counts_equal_brute_force(inputs, tmp_path, mode):
    """The default order: the same bytes as the brute force and the applied densities of
    R_X ⊙ M_X, recorded in the card and provenance."""
    params = {**BEFORE, "retention_order": "after_selection", "mask_mode": mode,
              "granularity": "layer"}
    res = merge(write_config(tmp_path / "c.yaml", inputs, params), tmp_path / "out")
    want, stats = brute.merge(inputs, params)
    assert_bits_equal(load_dir(tmp_path / "out"), want)
    for side, groups in stats.items():
        got = res.summary["applied"][side]["groups"]
        assert {g: got[g]["applied"] for g in got} == {g: st["applied"] for g, st in groups.items()}
        if mode != "none":
            assert "shortfall" not in res.summary["selection"][side]["groups"]["model.layers.0"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| retention_order | after_selection |" in card and "## Applied densities" in card


@pytest.mark.parametrize("chunk,budget", [("37", "1KB"), ("1000", "1MB"), (None, None)])
@pytest.mark.parametrize("case", ["fp32-scores", "bf16-scores-delta"])
def test_chunkings_and_budgets(tmp_path_factory, tmp_path, monkeypatch, case, chunk, budget):
    """Chunks of 37 elements (not whole Philox blocks, not whole rows), 1000 and whole
    tensors, under different --max-memory: the brute force's bits every time. bf16 scores:
    thresholds without a refinement pass; delta patches and a float32 output."""
    root = tmp_path_factory.getbasetemp() / f"chunk_inputs_{case}"
    if not root.exists():
        build_inputs(root, score_dtype=torch.bfloat16 if case.startswith("bf16") else torch.float32)
    paths = {k: root / k for k in ("base", "se", "osm", "scores_se", "scores_osm")}
    fmt, extra = "full", {}
    if case.endswith("delta"):
        from safetensors.torch import save_file

        base = load_dir(paths["base"])
        for side in ("se", "osm"):
            d = tmp_path / f"delta_{side}"
            d.mkdir()
            full = load_dir(paths[side])
            save_file({n: full[n].float() - base[n].float() for n in full}, str(d / "model.safetensors"))
            paths[side] = d
        fmt, extra = "delta", {"patches": {"format": "delta"}, "output": {"dtype": "float32"}}
    if chunk is not None:
        monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", chunk)
    params = {**BEFORE, "granularity": "layer", "retention": 0.45}
    cfg = write_config(tmp_path / "c.yaml", paths, params, **extra)
    res = merge(cfg, tmp_path / "out", max_memory=budget)
    if chunk is not None:
        assert res.plan.chunk_elements == int(chunk)
    want, stats = brute.merge(paths, params, patch_format=fmt,
                              out_dtype=torch.float32 if fmt == "delta" else None)
    assert_bits_equal(load_dir(tmp_path / "out"), want)
    assert_summary_matches(res.summary, stats, "difference")


def test_shortfall_when_top_rate_exceeds_retention(inputs, tmp_path, caplog):
    """a > p: fewer retained positive scores than k in every group, so T_X is every retained
    positive element; a warning names the rate and each short group; the card lists them."""
    params = {**BEFORE, "top_rate_se": 0.5, "retention": 0.3, "granularity": "layer"}
    cfg = write_config(tmp_path / "c.yaml", inputs, params)
    with caplog.at_level(logging.WARNING, logger="safepatch_merge.merge"):
        res = merge(cfg, tmp_path / "out")
    want, stats = brute.merge(inputs, params)
    assert_bits_equal(load_dir(tmp_path / "out"), want)
    assert_summary_matches(res.summary, stats, "difference")
    se = res.summary["selection"]["se"]["groups"]
    assert all(r["shortfall"] > 0 and r["threshold"] == 0.0 for r in se.values())
    assert all(r["shortfall"] == 0 for r in res.summary["selection"]["osm"]["groups"].values())
    # every retained positive SE score is in T_SE: the selected count is exactly those
    scores = load_dir(inputs["scores_se"])
    retained_pos = sum(int((brute.kept(n, t.numel(), 0.3, 7, 0) & (t.reshape(-1) > 0)).sum())
                       for n, t in scores.items())
    assert res.summary["selection"]["se"]["selected"] == retained_pos
    text = caplog.text
    assert "top_rate_se = 0.5 exceeds retention 0.3" in text
    for g in ("model.layers.0", "model.layers.1", "model.embed_tokens.weight", "lm_head.weight"):
        assert g in text
    assert "top_rate_osm" not in text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "fewer retained positive scores than k" in card and "- se model.layers.0:" in card


def test_validation_covers_dropped_elements(tmp_path):
    """A negative score on an element the draw drops is still an error naming the tensor."""
    paths = build_inputs(tmp_path / "in")
    scores = load_dir(paths["scores_osm"])
    name = "model.layers.1.mlp.down_proj.weight"
    t = scores[name].reshape(-1)
    dropped = ~brute.kept(name, t.numel(), 0.6, 7, 1)
    i = int(torch.nonzero(dropped)[3])
    t[i] = -0.5
    write_scores(tmp_path / "bad_osm", scores)
    paths = {**paths, "scores_osm": tmp_path / "bad_osm"}
    (paths["scores_osm"] / "histograms.safetensors").unlink()
    cfg = write_config(tmp_path / "c.yaml", paths, BEFORE)
    with pytest.raises(CheckpointError, match=rf"scores of tensor '{name}' contain 1 negative"):
        merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_threshold_caches_are_keyed_by_retention(inputs, tmp_path, monkeypatch):
    """thresholds.json and the retained-histogram cache of one work directory serve several
    settings without mixing them up, and a cached setting streams nothing."""
    from safepatch_merge.io.checkpoint import open_checkpoint
    from safepatch_merge.merge.stream import EngineContext
    from safepatch_merge.merge.thresholds import compute_thresholds_many
    from safepatch_merge.merge.select import Retention

    ckpts = {r: open_checkpoint(str(inputs[k]), r) for r, k in
             (("base", "base"), ("scores_se", "scores_se"), ("scores_osm", "scores_osm"))}
    work = tmp_path / "work"
    work.mkdir()
    ctx = EngineContext(ckpts, torch.device("cpu"), 1 << 20, 2, work, False)
    names = list(ckpts["scores_se"].tensors)
    settings = [Retention("before_selection", 0.6, 7), Retention("before_selection", 0.6, 8),
                Retention("before_selection", 0.4, 7), Retention("after_selection", 0.6, 7)]

    def thresholds(ret):
        jobs = {side: (f"scores_{side}", names, 0.3, "layer", ret, pid)
                for pid, side in enumerate(("se", "osm"))}
        return compute_thresholds_many(ctx, jobs)

    def expected(ret):
        params = {"top_rate_se": 0.3, "top_rate_osm": 0.3, "granularity": "layer",
                  "retention": ret.p, "seed": ret.seed, "retention_order": ret.order}
        return brute.merge(inputs, params)[1]

    first = {}
    for ret in settings:
        first[ret] = thresholds(ret)
        want = expected(ret)
        for side in ("se", "osm"):
            got = {g: (s.k, s.n, s.selected) for g, s in first[ret][side].items()}
            assert got == {g: (st["k"], st["n"], st["selected"]) for g, st in want[side].items()}
    assert len(json.loads((work / "thresholds.json").read_text())) == 2 * len(settings)
    assert len(list(work.glob("hist0_scores_*_retained_*.safetensors"))) == 2 * 3
    monkeypatch.setattr(EngineContext, "stream_entries",
                        lambda *a, **k: pytest.fail("a cached setting streamed scores"))
    for ret in settings:
        assert thresholds(ret) == first[ret]


def test_dry_run_says_it_reads_the_scores_again(inputs, tmp_path):
    from safepatch_merge.cli.merge_cmd import format_plan

    before = merge(write_config(tmp_path / "b.yaml", inputs, BEFORE), tmp_path / "b", dry_run=True)
    text = format_plan(before.plan)
    assert "the pre-pass streams the scores once more" in text
    score_bytes = sum(f.stat().st_size for k in ("scores_se", "scores_osm")
                      for f in inputs[k].glob("model*.safetensors"))
    extra = before.plan.summary["prepass"]["retained_histograms_bytes"]
    assert 0.9 * score_bytes < extra <= score_bytes  # tensor bytes, without headers
    for params in ({**BEFORE, "retention_order": "after_selection"},
                   {**BEFORE, "retention": 1.0}, {**BEFORE, "mask_mode": "none"}):
        plan = merge(write_config(tmp_path / "a.yaml", inputs, params), tmp_path / "a",
                     dry_run=True).plan
        assert "prepass" not in plan.summary
        assert "streams the scores once more" not in format_plan(plan)


def test_orders_give_the_same_bytes_where_they_must_agree(inputs, tmp_path):
    """p = 1 and mode none: the weights are the same under both orders (the card and the
    provenance record which order was asked for)."""
    for label, params in (("p1", {**BEFORE, "retention": 1.0, "rescale": False}),
                          ("none", {**BEFORE, "mask_mode": "none"})):
        outs = {}
        for order in ("after_selection", "before_selection"):
            cfg = write_config(tmp_path / f"{label}_{order}.yaml", inputs,
                               {**params, "retention_order": order})
            merge(cfg, tmp_path / f"{label}_{order}")
            outs[order] = {f: b for f, b in dir_bytes(tmp_path / f"{label}_{order}").items()
                           if f.endswith(".safetensors")}
        assert outs["after_selection"] == outs["before_selection"], label
        merged = load_dir(tmp_path / f"{label}_before_selection")
        base = load_dir(inputs["base"])
        assert any(not torch.equal(merged[n], base[n]) for n in base), label  # not a no-op
