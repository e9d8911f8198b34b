"""`safepatch sweep` on a tiny model: grid points, achieved densities, the merged weights equal
a plain `merge`, reruns and grid extensions evaluate only new points, Pareto front."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from safepatch_merge.merge import merge
from safepatch_merge.pipeline.sweep import SweepConfig, _merge_cfg, pareto_front, sweep

from merge_helpers import build_inputs, load_dir


def test_pareto_front():
    xs = [0.1, 0.2, 0.1, 0.3, 0.05, float("nan"), 0.2]
    ys = [0.5, 0.2, 0.6, 0.1, 0.9, 0.0, 0.2]
    # (0.1,0.6) is dominated by (0.1,0.5); duplicates (0.2,0.2) are both optimal; NaN never
    assert pareto_front(xs, ys) == [True, True, False, True, True, False, True]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("sweep_in"), dtype=torch.float32)


def _cfg(p, **kw) -> SweepConfig:
    base = dict(backbone=str(p["base"]), patch_se=str(p["se"]), patch_osm=str(p["osm"]),
                scores_se=str(p["scores_se"]), scores_osm=str(p["scores_osm"]),
                top_rate_se=[0.1, 0.5], top_rate_osm=[0.2], alpha=[1.0, 2.0],
                suites=["xstest", "harmbench"], limit=2, max_new_tokens=3, batch_size=4,
                utility_limit=2, utility_max_tokens=8, device="cpu")
    return SweepConfig(**{**base, **kw})


def test_sweep_grid_table_plot_and_resume(inputs, tmp_path):
    out = tmp_path / "sw"
    res = sweep(_cfg(inputs), out, progress=False)
    assert res["points"] == 4 and len(res["ran"]) == 4
    rows = res["rows"]
    assert [r["id"] for r in rows][0] == "backbone" and len(rows) == 5
    grid = [(r["top_rate_se"], r["alpha"]) for r in rows[1:]]
    assert grid == [(0.1, 1.0), (0.1, 2.0), (0.5, 1.0), (0.5, 2.0)]
    for r in rows[1:]:
        # achieved top-k densities: ties at the threshold included, zero scores never
        assert abs(r["density_se"] - r["top_rate_se"]) < 0.01
        assert abs(r["density_osm"] - 0.2) < 0.01
        assert r["harmful_n"] == 2 and r["over_refusal_n"] == 1
        assert r["utility_ppl"] > 1
    flags = pareto_front([r["over_refusal"] for r in rows], [r["harmful"] for r in rows])
    assert [r["pareto"] for r in rows] == flags and any(flags)
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "★" in (out / "sweep.md").read_text()
    assert not list((out / "points").glob("*/model"))  # deleted after evaluation
    # merged-model utility differs between points: the merges really differ
    assert len({round(r["utility_ppl"], 6) for r in rows[1:]}) > 1

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "points").rglob("results.json")}
    res2 = sweep(_cfg(inputs), out, progress=False)
    assert res2["ran"] == [] and [r["id"] for r in res2["rows"]] == [r["id"] for r in rows]
    assert {p: p.stat().st_mtime_ns for p in (out / "points").rglob("results.json")} == mtimes
    res3 = sweep(_cfg(inputs, alpha=[1.0, 2.0, 0.5]), out, progress=False)
    assert len(res3["ran"]) == 2 and len(res3["rows"]) == 7


def test_sweep_point_equals_plain_merge(inputs, tmp_path):
    cfg = _cfg(inputs, top_rate_se=[0.3], alpha=[1.5], retention=[0.7], keep_models=True,
               eval_backbone=False, utility=False)
    res = sweep(cfg, tmp_path / "sw", progress=False)
    (pid,) = res["ran"]
    got = load_dir(tmp_path / "sw/points" / pid / "model")
    pt = cfg.grid()[0]
    ref = merge(_merge_cfg(cfg, pt), tmp_path / "ref")
    want = load_dir(ref.out_dir)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], load_dir(inputs["base"])[k]) for k in want)
    prov = json.loads((tmp_path / "sw/points" / pid / "model/safepatch_provenance.json").read_text())
    assert prov["result"]["parameters"]["retention"] == 0.7
    assert math.isclose(prov["result"]["parameters"]["alpha"], 1.5)
