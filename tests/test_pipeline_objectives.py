"""`safepatch run` config: the SE objective, its own data, confinement, calibration files."""
import pytest

from safepatch_merge.errors import ConfigError
from safepatch_merge.pipeline.config import parse_run_config


def _raw(tmp_path, **derive):
    return {"backbone": "bb", "data": "dh.jsonl", "derive": derive,
            "score": {"saliency_on": "questions"},
            "eval": {"utility_file": "reference.jsonl"}}


def test_se_objective_own_data_and_paths(tmp_path):
    raw = _raw(tmp_path, train_exclude="lm_head.*",
               se={"objective": "refusal_sft", "data": "refusals.json", "prompt_field": "instruction",
                   "response_field": "output", "input_field": "input",
                   "calib_prompts": "calib.jsonl", "calib_reference": "calib_ref.jsonl",
                   "stop_when": "refusal_rate>=0.8"})
    (st,) = parse_run_config(raw, tmp_path).stages
    se, osm = st.derive["se"], st.derive["osm"]
    assert (se.objective, osm.objective) == ("refusal_sft", "gd")
    assert st.train_data("se") == str(tmp_path / "refusals.json")
    assert st.train_data("osm") == str(tmp_path / "dh.jsonl")
    assert se.train_exclude == osm.train_exclude == ["lm_head.*"]
    assert se.stop_when == ["refusal_rate>=0.8"] and se.calib_prompts == str(tmp_path / "calib.jsonl")
    assert st.training_files() == [str(tmp_path / f) for f in
                                   ("dh.jsonl", "refusals.json", "calib.jsonl", "calib_ref.jsonl")]
    assert st.score["se"].loss == "question_nll"


def test_graddiff_and_npo_options(tmp_path):
    raw = _raw(tmp_path, se={"objective": "graddiff", "retain_data": "alpaca.json",
                             "retain_weight": 0.5, "on_policy": True})
    (st,) = parse_run_config(raw, tmp_path).stages
    assert st.derive["se"].retain_data == str(tmp_path / "alpaca.json")
    assert st.derive["se"].retain_weight == 0.5 and st.derive["se"].on_policy
    assert str(tmp_path / "alpaca.json") in st.training_files()
    raw = _raw(tmp_path, se={"objective": "npo", "npo_beta": 0.2})
    assert parse_run_config(raw, tmp_path).stages[0].derive["se"].npo_beta == 0.2


@pytest.mark.parametrize("derive, msg", [
    ({"se": {"objective": "gd"}}, "derive.se.objective: expected one of ga, npo"),
    ({"osm": {"objective": "npo"}}, "derive.osm.objective: expected one of gd"),
    ({"objective": "npo"}, "unknown config key stages[0].derive.objective"),
    ({"data": "x.jsonl"}, "unknown config key stages[0].derive.data"),
    ({"se": {"objective": "graddiff"}}, "derive.se: objective graddiff needs a retain set"),
    ({"retain_data": "a.json", "se": {"objective": "graddiff"}},
     "derive.osm: retain_data is only used by graddiff"),
    ({"se": {"stop_when": ["perplexity>=9"], "calib_reference": "reference.jsonl"}},
     "calib_reference is the eval's utility file"),
])
def test_config_errors(tmp_path, derive, msg):
    with pytest.raises(ConfigError) as e:
        parse_run_config(_raw(tmp_path, **derive), tmp_path)
    assert msg in str(e.value)


def test_run_with_npo_on_policy_scores_the_on_policy_pairs(tmp_path, monkeypatch):
    import json

    from derive_helpers import tiny_setup
    from safepatch_merge.eval import generate
    from safepatch_merge.pipeline.run import run_pipeline

    bb, data = tiny_setup(tmp_path)
    monkeypatch.setattr(generate, "generate_completions", lambda m, t, prompts, *a, **k: [
        {"completion": f"Sure: first {p.text[:10]}, then the rest."} for p in prompts])
    common = {"batch_size": 2, "max_length": 96, "max_steps": 2, "learning_rate": 1e-2,
              "heldout": 0}
    raw = {"backbone": str(bb), "data": str(data),
           "derive": {**common, "se": {"objective": "npo", "on_policy": True,
                                       "on_policy_min_pairs": 2,
                                       "train_exclude": ["*norm*"]}},
           "score": {"max_length": 96, "saliency_on": "questions"},
           "merge": {"parameters": {"top_rate_se": 0.1, "top_rate_osm": 0.1}},
           "eval": {"enabled": False}}
    rec = run_pipeline(raw, tmp_path / "run", progress=False, log_fn=lambda m: None)
    (st,) = rec["stages"]
    assert st["objectives"] == {"se": "npo", "osm": "gd"}
    se_rec = json.loads((tmp_path / "run/stages/01-main/patch_se/derive_record.json").read_text())
    assert se_rec["data"]["on_policy"]["kept"] == 6 and se_rec["confinement"]["frozen"] > 0
    info = json.loads((tmp_path / "run/stages/01-main/scores_se/score_info.json").read_text())
    assert info["data"]["path"].endswith("patch_se/on_policy/on_policy_pairs.jsonl")
    assert info["loss"] == "question_nll" and info["data"]["num_examples"] == 6
    osm = json.loads((tmp_path / "run/stages/01-main/scores_osm/score_info.json").read_text())
    assert osm["data"]["path"] == str(data.resolve())


def test_example_config_parses():
    from pathlib import Path

    from safepatch_merge.pipeline.config import load_run_config

    path = Path(__file__).resolve().parents[1] / "examples" / "run_se_objectives.yaml"
    (st,) = load_run_config(path).stages
    se = st.derive["se"]
    assert (se.objective, se.npo_beta, st.derive["osm"].objective) == ("npo", 0.1, "gd")
    assert se.train_exclude == st.derive["osm"].train_exclude == [
        "model.embed_tokens.*", "lm_head.*", "*norm*"]
    assert len(se.stop_rules()) == 1 and len(se.guard_rules()) == 2
    assert se.calib_prompts.endswith("data/calib_harmful.jsonl")
    assert st.score["se"].loss == st.score["osm"].loss == "question_nll"
