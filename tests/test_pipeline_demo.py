"""`safepatch demo` wiring on a tiny model (the real SmolLM2 demo is too slow for tests; its
measured run is in the report): config validity, D_h generation's judge filter and errors."""
from __future__ import annotations

import json

import pytest

from safepatch_merge.errors import ConfigError, DataError
from safepatch_merge.pipeline.config import parse_run_config
from safepatch_merge.pipeline.demo import DemoConfig, demo_run_config, generate_harmful_pairs, run_demo


def test_demo_config_is_a_valid_run_config(tmp_path):
    cfg = DemoConfig(eval_limit=7, se_steps=3, alpha=0.5)
    run = demo_run_config(str(tmp_path / "bb"), str(tmp_path / "dh.jsonl"), cfg)
    rc = parse_run_config(run)
    (st,) = rc.stages
    assert st.name == "SafePatching"  # the patched model's label in the report
    assert st.derive["se"].objective == "ga" and st.derive["se"].max_steps == 3
    assert st.derive["osm"].objective == "gd" and st.derive["se"].save_dtype == "float32"
    assert st.merge["parameters"]["alpha"] == 0.5 and st.merge["output"]["dtype"] == "float32"
    assert st.eval["limit"] == 7 and st.eval["dedup"]
    assert cfg.dh_suite not in st.eval["suites"]


def test_demo_refuses_to_evaluate_its_dh_suite():
    with pytest.raises(ConfigError, match="never be evaluated"):
        DemoConfig(eval_suites=("xstest", "advbench")).validate()


def test_generate_harmful_pairs_keeps_only_compliant_answers(tmp_path, monkeypatch):
    from safepatch_merge.eval import generate
    from safepatch_merge.testing import make_tiny_model_dir

    bb = make_tiny_model_dir(tmp_path / "bb", seed=0)
    answers = iter(["Sure, here is how to do it: first gather the materials you need, then "
                    "follow each step of the plan carefully and in order.",
                    "I'm sorry, but I can't help with that.",
                    "", "Of course. Step one is to find a quiet place and plan it."] * 10)

    def fake_generate(model, tok, prompts, settings, fp, cache, batch_size=8, progress=True):
        return [{"completion": next(answers)} for _ in prompts]

    monkeypatch.setattr(generate, "generate_completions", fake_generate)
    cfg = DemoConfig(dh_prompts=8, dh_min_pairs=2, device="cpu")
    rep = generate_harmful_pairs(bb, tmp_path / "dh", cfg, progress=False)
    assert rep["prompts"] == 8 and rep["kept"] == 4
    assert rep["outcomes"] == {"compliance": 4, "refusal": 2, "non_answer": 0, "degenerate": 2}
    rows = [json.loads(l) for l in (tmp_path / "dh/harmful_pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["source"].startswith("advbench:") for r in rows)
    assert {r["response"][:4] for r in rows} == {"Sure", "Of c"}
    with pytest.raises(DataError, match="only 4 of 8 advbench answers"):
        generate_harmful_pairs(bb, tmp_path / "dh2", DemoConfig(dh_prompts=8, dh_min_pairs=5,
                                                                  device="cpu"), progress=False)
    assert not (tmp_path / "dh2/harmful_pairs.jsonl").exists()


def test_demo_rejects_a_backbone_that_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        run_demo(tmp_path / "o", DemoConfig(backbone=str(tmp_path), dh_model=str(tmp_path)),
                 log_fn=lambda m: None)


def test_demo_command_prints_what_to_expect(monkeypatch, capsys):
    """The demo's output ends with what a user should expect, whose numbers are the frontier
    study's default configuration (three seeds) and the demo's own run."""
    import safepatch_merge.pipeline.demo as demo
    from safepatch_merge.cli import main
    from safepatch_merge.merge import defaults

    cfg = demo.DemoConfig()
    assert (cfg.top_rate_se, cfg.top_rate_osm, cfg.alpha, cfg.beta) == (
        defaults.TOP_RATE_SE, defaults.TOP_RATE_OSM, defaults.ALPHA, defaults.BETA)
    fake = {"table": "| metric |\n", "timings": {"total": 1.0}, "cpu_seconds": {"total": 1.0},
            "model": "/m", "report": {"plot": "/p.png"}}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: fake)
    assert main(["demo", "-o", "/tmp/never-written"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "What to expect with the default options:" in out and "from 52 % to 22 %" in out and "/p.png" in out
