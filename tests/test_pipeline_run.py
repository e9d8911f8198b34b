"""`safepatch run` end to end on tiny models: a two-stage continual run, a rerun that skips every
finished step, a changed merge option that reruns only merge and eval, config errors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safepatch_merge.errors import ConfigError
from safepatch_merge.pipeline.config import parse_run_config
from safepatch_merge.pipeline.run import run_pipeline
from safepatch_merge.pipeline.stages import dir_fingerprint

from derive_helpers import PAIRS, tiny_setup, write_pairs

STEPS = ["derive_se", "derive_osm", "score_se", "score_osm", "merge", "eval"]


def _config(bb: Path, d1: Path, d2: Path) -> dict:
    return {
        "backbone": str(bb), "device": "cpu",
        "stages": [{"name": "s1", "data": str(d1)},
                   {"name": "s2", "data": str(d2),
                    "merge": {"parameters": {"top_rate_se": 0.3}}}],
        "derive": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "heldout": 0,
                   "max_length": 64, "se": {"nll_ceiling": 50.0}},
        "score": {"batch_size": 6, "max_length": 64},
        "merge": {"parameters": {"top_rate_se": 0.2, "top_rate_osm": 0.2}},
        "eval": {"suites": ["xstest", "harmbench"], "limit": 2, "max_new_tokens": 3,
                 "batch_size": 4, "utility_limit": 2, "utility_max_tokens": 8},
    }


def _mtimes(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))
            if p.is_file()}


def _weights(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _status(rec) -> dict:
    return {(s["stage"], s["step"]): s["status"] for s in rec["steps"]}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    bb, d1 = tiny_setup(root)
    other = [{"prompt": p["prompt"].replace("question", "query"),
              "response": p["response"].replace("step", "move")} for p in PAIRS]
    d2 = write_pairs(root / "pairs2.jsonl", other)
    cfg = _config(bb, d1, d2)
    out = root / "run"
    rec = run_pipeline(cfg, out, progress=False)
    # state[0] is the config the run directory is up to date with (tests below change it)
    return [cfg], out, rec


def test_first_run_runs_every_step_and_evaluates_each_stage(first_run):
    (cfg,), out, rec = first_run
    st = _status(rec)
    assert st[("00-backbone", "eval")] == "ran"
    for sid in ("01-s1", "02-s2"):
        for step in STEPS:
            assert st[(sid, step)] == "ran", (sid, step)
    # an eval after every stage (and one of the first backbone), with the configured sizes
    for ev in (out / "backbone_eval", out / "stages/01-s1/eval", out / "stages/02-s2/eval"):
        res = json.loads((ev / "results.json").read_text())
        assert res["limit"] == 2 and res["settings"]["max_new_tokens"] == 3
        assert [r["suite"] for r in res["records"]].count("harmbench") == 2
        assert res["utility"]["n_docs"] == 2
    assert (out / "report/compare.md").read_text().count("|") > 10
    assert rec["final_model"] == str(out / "stages/02-s2/model")


def test_two_stage_continual_uses_stage1_output_as_backbone(first_run):
    (cfg,), out, rec = first_run
    s1, s2 = rec["stages"]
    m1, m2 = out / "stages/01-s1/model", out / "stages/02-s2/model"
    assert s1["backbone"] == cfg["backbone"] and s1["backbone_from"] == "config"
    assert s2["backbone"] == str(m1) and s2["backbone_from"] == "stage s1"
    man1 = json.loads((out / "manifests/01-s1/merge.json").read_text())
    assert s2["backbone_id"] == man1["output_id"] == dir_fingerprint(m1)
    # what the steps themselves recorded: derive record, score info, merge provenance
    for side in ("se", "osm"):
        drec = json.loads((out / f"stages/02-s2/patch_{side}/derive_record.json").read_text())
        assert drec["backbone"] == str(m1)
        sinfo = json.loads((out / f"stages/02-s2/scores_{side}/score_info.json").read_text())
        assert sinfo["backbone"] == str(m1)
    prov = json.loads((m2 / "safepatch_provenance.json").read_text())
    assert Path(prov["inputs"]["base"]["source"]).resolve() == m1
    assert prov["result"]["parameters"]["top_rate_se"] == 0.3  # the stage's own override
    w0, w1, w2 = _weights(Path(cfg["backbone"])), _weights(m1), _weights(m2)
    diff01 = sum(int((w0[k] != w1[k]).sum()) for k in w0)
    diff12 = sum(int((w1[k] != w2[k]).sum()) for k in w1)
    assert diff01 > 0 and diff12 > 0
    # stage 2 patched on top of stage 1: where stage 2 left a weight alone it is stage 1's
    k = "model.layers.0.mlp.down_proj.weight"
    same = w2[k] == w1[k]
    assert same.any() and torch.equal(w2[k][same], w1[k][same])


def test_rerun_skips_finished_steps(first_run):
    (cfg,), out, _ = first_run
    before = _mtimes(out / "stages") | {f"bb/{k}": v for k, v in _mtimes(out / "backbone_eval").items()}
    rec = run_pipeline(cfg, out, progress=False)
    assert set(_status(rec).values()) == {"skipped"}
    assert len(rec["steps"]) == 1 + 2 * len(STEPS)
    after = _mtimes(out / "stages") | {f"bb/{k}": v for k, v in _mtimes(out / "backbone_eval").items()}
    # stage.json is rewritten (same content); every step output keeps its bytes and mtimes
    assert {k: v for k, v in after.items() if not k.endswith("stage.json")} == \
        {k: v for k, v in before.items() if not k.endswith("stage.json")}
    run = json.loads((out / "run.json").read_text())
    assert {s["status"] for s in run["steps"]} == {"skipped"}


def test_changed_merge_option_reruns_downstream_only(first_run):
    state, out, _ = first_run
    cfg2 = copy.deepcopy(state[0])
    cfg2["stages"][1]["merge"]["parameters"]["alpha"] = 0.5
    m2 = out / "stages/02-s2/model"
    w_before = _weights(m2)
    patch_mtimes = _mtimes(out / "stages/02-s2/patch_se")
    rec = run_pipeline(cfg2, out, progress=False)
    st = _status(rec)
    assert all(v == "skipped" for (sid, _), v in st.items() if sid != "02-s2")
    assert [st[("02-s2", s)] for s in STEPS] == ["skipped"] * 4 + ["ran", "ran"]
    reasons = {s["step"]: s["reason"] for s in rec["steps"] if s["status"] == "ran"}
    assert reasons == {"merge": "inputs changed", "eval": "inputs changed"}
    assert _mtimes(out / "stages/02-s2/patch_se") == patch_mtimes
    w_after = _weights(m2)
    assert any(not torch.equal(w_before[k], w_after[k]) for k in w_before)
    prov = json.loads((m2 / "safepatch_provenance.json").read_text())
    assert prov["result"]["parameters"]["alpha"] == 0.5
    # a changed output file (here: deleted scores) is noticed and redone with what follows
    (out / "stages/01-s1/scores_osm/histograms.safetensors").unlink()
    rec = run_pipeline(cfg2, out, progress=False)
    state[0] = cfg2
    st = _status(rec)
    assert st[("01-s1", "score_osm")] == "ran" and st[("01-s1", "score_se")] == "skipped"
    assert st[("01-s1", "merge")] == "ran"
    assert (out / "stages/01-s1/scores_osm/histograms.safetensors").is_file()


def test_cli_rerun_and_config_errors(first_run, tmp_path, capsys):
    import yaml

    from safepatch_merge.cli import main

    (cfg,), out, _ = first_run
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(y), str(out), "--no-progress"]) == 0
    assert "0 step(s) ran" in capsys.readouterr().out
    bad = copy.deepcopy(cfg)
    bad["stages"][0]["merge"] = {"parameters": {"top_rate": 0.1}}
    y.write_text(yaml.safe_dump(bad))
    assert main(["run", str(y), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "stages[0].merge" in err and "top_rate" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("patch, msg", [
    ({"bogus": 1}, "unknown config key bogus"),
    ({"derive": {"se": {"max_step": 3}}}, "derive.se.max_step"),
    ({"derive": {"max_steps": 0}}, "derive.se: max_steps must be >= 1"),
    ({"score": {"loss": "l2"}}, "score.se: loss must be one of"),
    ({"eval": {"limits": 3}}, "unknown config key stages[0].eval.limits"),
    ({"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens"),
    ({"merge": {"parameters": {"alpha": "x"}}}, "parameters.alpha"),
    ({"merge": {"patches": {"se": "elsewhere"}}}, "unknown config key stages[0].merge.patches.se"),
    ({"stages": [{"name": "a", "data": "x"}, {"name": "a", "data": "y"}]}, "duplicate stage"),
    ({"stages": [{"name": "a"}]}, "stages[0].data: required"),
])
def test_config_validation(tmp_path, patch, msg):
    raw = {"backbone": str(tmp_path), "data": "pairs.jsonl"}
    if "stages" in patch:
        raw.pop("data")
    raw.update(patch)
    with pytest.raises(ConfigError) as e:
        parse_run_config(raw, tmp_path)
    assert msg in str(e.value)


def test_config_defaults_and_overrides(tmp_path):
    raw = {"backbone": "bb", "data": "d.jsonl",
           "derive": {"learning_rate": 2e-5, "osm": {"learning_rate": 1e-4, "lora": True}},
           "eval": {"suites": "xstest"}}
    cfg = parse_run_config(raw, tmp_path)
    (st,) = cfg.stages
    assert st.name == "main" and st.data == str(tmp_path / "d.jsonl")
    assert cfg.backbone == str(tmp_path / "bb")
    assert (st.derive["se"].objective, st.derive["osm"].objective) == ("ga", "gd")
    assert st.derive["se"].learning_rate == 2e-5 and not st.derive["se"].lora
    assert st.derive["osm"].learning_rate == 1e-4 and st.derive["osm"].lora
    assert st.eval["suites"] == ["xstest"] and st.eval["enabled"] and st.eval["backbone"]


@pytest.mark.parametrize("name", ["run_gpu.yaml", "run_continual.yaml"])
def test_example_configs_parse(name):
    from safepatch_merge.pipeline.config import load_run_config

    path = Path(__file__).resolve().parents[1] / "examples" / name
    cfg = load_run_config(path)
    assert cfg.backbone == str((path.parent / "../models").resolve() / Path(cfg.backbone).name)
    if name == "run_continual.yaml":
        s1, s2 = cfg.stages
        assert s2.derive["se"].max_steps == 20 and s1.derive["se"].max_steps == 40
        assert s2.merge["parameters"] == {"top_rate_se": 0.05, "top_rate_osm": 0.1,
                                          "alpha": 0.5, "beta": 1.0}
    else:
        (st,) = cfg.stages
        assert st.derive["se"].nll_ceiling == 8.0 and st.derive["osm"].nll_floor == 0.5
        assert st.eval["suites"] == ["xstest", "harmbench", "strongreject"]
