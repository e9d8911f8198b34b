"""Configs declared once (config_fields.py): the CLI options and the YAML checks come from the
dataclasses, their defaults agree, bad YAML keys give one-line errors naming the key, and the
config modules import no torch."""
import argparse
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from safepatch_merge.cli import build_parser
from safepatch_merge.config_fields import (FieldError, add_arguments, build, check_mapping,
                                           field_types, from_args, from_mapping, help_text,
                                           option, yaml_keys)
from safepatch_merge.derive.config import DeriveConfig
from safepatch_merge.errors import ConfigError
from safepatch_merge.eval.config import EvalConfig
from safepatch_merge.pipeline.config import parse_run_config
from safepatch_merge.pipeline.demo import DemoConfig
from safepatch_merge.pipeline.sweep_config import SweepConfig
from safepatch_merge.score.config import ScoreConfig

CONFIG_MODULES = ("safepatch_merge.config_fields", "safepatch_merge.derive.config",
                  "safepatch_merge.score.config", "safepatch_merge.eval.config",
                  "safepatch_merge.pipeline.config", "safepatch_merge.pipeline.sweep_config",
                  "safepatch_merge.pipeline.demo")


def test_config_modules_and_the_parser_import_no_torch():
    probe = ("import importlib, json, sys\n"
             f"for m in {CONFIG_MODULES!r}: importlib.import_module(m)\n"
             "from safepatch_merge.cli import build_parser\nbuild_parser()\n"
             "from safepatch_merge.derive.config import DeriveConfig\n"
             "from safepatch_merge.score.config import ScoreConfig\n"
             "from safepatch_merge.eval.config import EvalConfig\n"
             "DeriveConfig(), ScoreConfig(), EvalConfig()\n"
             "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


# each command, the arguments it needs, and the config its options build
MINIMAL = {
    "derive": (["BB", "--data", "D", "--objective", "ga", "-o", "X"], DeriveConfig, {}),
    "score": (["P", "-o", "X"], ScoreConfig, {}),
    "eval": (["M", "-o", "X"], EvalConfig, {}),
    "sweep": (["-o", "X", "--backbone", "B"], SweepConfig,
              {"backbone": "B", "patch_se": None, "patch_osm": None, "scores_se": None,
               "scores_osm": None}),
    "demo": ([], DemoConfig, {}),
}


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_cli_defaults_are_the_dataclass_defaults(command):
    argv, cls, fixed = MINIMAL[command]
    parser = build_parser()
    args = parser.parse_args([command, *argv])
    base = {k: v for k, v in fixed.items() if k != "backbone"}
    cfg = from_args(cls, args, base=base)
    assert cfg == cls(**fixed)
    # and option by option: the parser's default is the field's declared default (None for
    # an appending flag, which then leaves the field's default)
    actions = {a.dest: a for a in parser.commands[command]._actions}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in fixed:
            continue
        a = actions[f.name]
        declared = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        want = None if f.metadata.get("append") else declared
        if f.metadata.get("required"):
            assert a.required, f.name
        else:
            assert a.default == want, f.name
        assert a.help == help_text(f), f.name


def test_every_derive_option_reaches_its_field():
    """Each flag (renamed ones too: --lr, --no-merged) lands in the field of its name."""
    parser = build_parser()
    base = ["derive", "BB", "--data", "D", "--objective", "gd", "-o", "X"]
    ftypes = field_types(DeriveConfig)
    actions = {a.dest: a for a in parser.commands["derive"]._actions}
    for f in dataclasses.fields(DeriveConfig):
        if f.name == "objective":
            continue
        t, a = ftypes[f.name], actions[f.name]
        flag = a.option_strings[-1]
        if t.scalar is bool:
            argv, want = [flag], not f.default
        elif a.choices:
            want = [c for c in a.choices if c != f.default][0]
            argv = [flag, want]
        elif t.is_list:
            argv, want = [flag, "a*", "b*"], ["a*", "b*"]
        elif t.scalar is str:
            argv, want = [flag, "zz"], "zz"
        else:
            argv, want = [flag, "7"], t.scalar(7)
        assert getattr(parser.parse_args(base + argv), f.name) == want, flag


def test_help_shows_the_declared_default():
    actions = {a.dest: a for a in build_parser().commands["derive"]._actions}
    assert actions["max_steps"].help == "step budget (default 100)"
    assert actions["lora_target"].help.startswith("module names (default all-linear:")
    demo = {a.dest: a for a in build_parser().commands["demo"]._actions}
    assert demo["eval_suites"].help == "eval suite (repeat; default xstest harmbench strongreject)"
    assert demo["eval_suites"].default is None
    args = build_parser().parse_args(["demo", "--eval-suite", "advbench", "--se-lr", "0.5"])
    cfg = from_args(DemoConfig, args)
    assert cfg.eval_suites == ("advbench",) and cfg.se_lr == 0.5 and cfg.osm_lr == 2e-5


def test_renamed_flags_build_the_config():
    args = build_parser().parse_args(["derive", "BB", "--data", "D", "--objective", "gd", "-o",
                                      "X", "--lr", "2e-4", "--lora", "--no-merged",
                                      "--train-exclude", "lm_head.*"])
    cfg = from_args(DeriveConfig, args)
    assert (cfg.learning_rate, cfg.lora, cfg.save_merged) == (2e-4, True, False)
    assert cfg.train_exclude == ["lm_head.*"] and cfg.objective == "gd"
    ev = from_args(EvalConfig, build_parser().parse_args(
        ["eval", "M", "-o", "X", "--suite", "xstest", "--suite", "advbench", "--no-utility",
         "--no-chat-template", "--file-prompts", "benign"]))
    kw = ev.evaluate_kwargs()
    assert kw["suites"] == ["xstest", "advbench"] and kw["utility"] is False
    assert kw["settings"].chat_template is False and kw["user_harmful"] is False


def _run_error(tmp_path, **sections) -> str:
    raw = {"backbone": str(tmp_path), "data": "pairs.jsonl", **sections}
    with pytest.raises(ConfigError) as e:
        parse_run_config(raw, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("sections, want", [
    ({"derive": {"max_steps": "ten"}},
     "stages[0].derive.max_steps: expected an integer, got 'ten'"),
    ({"derive": {"osm": {"lora": "yes"}}},
     "stages[0].derive.osm.lora: expected true or false, got 'yes'"),
    ({"derive": {"learning_rate": "1e-5"}},
     "stages[0].derive.learning_rate: expected a number, got '1e-5' (YAML reads"),
    ({"derive": {"train_exclude": [1, 2]}},
     "stages[0].derive.train_exclude: expected a list of strings, got [1, 2]"),
    ({"derive": {"max_steps": True}}, "stages[0].derive.max_steps: expected an integer"),
    ({"derive": {"save_merged": None}}, "stages[0].derive.save_merged: expected true or false, "
                                        "got null"),
    ({"score": {"se": {"batch_size": 2.5}}},
     "stages[0].score.se.batch_size: expected an integer, got 2.5"),
    ({"score": {"lossy": 1}}, "unknown config key stages[0].score.lossy"),
    ({"eval": {"limit": "all"}}, "stages[0].eval.limit: expected an integer or null, got 'all'"),
    ({"eval": {"limit": 0}}, "stages[0].eval.limit: expected a positive integer or null, got 0"),
    ({"eval": {"device": "cuda"}}, "unknown config key stages[0].eval.device"),
    ({"eval": {"suites": []}}, "stages[0].eval.suites: expected a non-empty list"),
])
def test_run_config_key_errors_name_the_key(tmp_path, sections, want):
    assert want in _run_error(tmp_path, **sections)


def test_run_config_accepts_what_it_always_did(tmp_path):
    cfg = parse_run_config({"backbone": "b", "data": "d.jsonl",
                            "derive": {"heldout": 0, "lora_target": "q_proj",
                                       "se": {"nll_ceiling": 8}},
                            "score": {"saliency_on": "questions", "dist_timeout": 60},
                            "eval": {"suites": "xstest", "temperature": 0, "limit": 4}},
                           tmp_path)
    (st,) = cfg.stages
    se = st.derive["se"]
    assert se.heldout == 0 and se.lora_target == ["q_proj"] and se.nll_ceiling == 8
    assert st.score["osm"].loss == "question_nll" and st.score["se"].dist_timeout == 60
    assert st.eval.suites == ["xstest"] and st.eval["limit"] == 4
    assert set(cfg.summary()["stages"][0]["eval"]) == set(yaml_keys(EvalConfig))
    with pytest.raises(dataclasses.FrozenInstanceError):
        se.max_steps = 3


# the generic machinery on a small config of its own
@dataclass(frozen=True)
class _Toy:
    name: str = option(help="required on the CLI", required=True)
    rate: float = option(0.5, help="a rate", group="numbers")
    steps: int | None = option(None, group="numbers")
    tags: list[str] = option(["a"], metavar="TAG")
    files: list[str] = option([], append=True, flag="--file")
    keep: bool = option(True, flag="--drop")
    fast: bool = option(False)
    mode: str = option("x", choices=("x", "y"))
    secret: int = option(1, cli=False)
    local: str = option("here", yaml=False)

    def __post_init__(self):
        if self.rate < 0:
            raise FieldError("rate", f"must be >= 0, got {self.rate}")
        if self.mode == "y" and self.steps is None:
            raise ConfigError("mode y needs steps")


def _toy_parser():
    p = argparse.ArgumentParser()
    add_arguments(p, _Toy)
    return p


def test_add_arguments_and_from_args():
    p = _toy_parser()
    assert from_args(_Toy, p.parse_args(["--name", "n"])) == _Toy(name="n")
    args = p.parse_args(["--name", "n", "--rate", "2", "--steps", "3", "--tags", "b", "c",
                         "--file", "f1", "--file", "f2", "--drop", "--fast", "--mode", "y",
                         "--local", "there"])
    assert from_args(_Toy, args) == _Toy(name="n", rate=2.0, steps=3, tags=["b", "c"],
                                         files=["f1", "f2"], keep=False, fast=True, mode="y",
                                         local="there")
    assert not hasattr(args, "secret")
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "n", "--mode", "z"])
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required
    titles = [g.title for g in p._action_groups]
    assert "numbers" in titles
    # a base mapping fills what the command line left unset
    assert from_args(_Toy, p.parse_args(["--name", "n"]), base={"steps": 9}).steps == 9
    assert from_args(_Toy, p.parse_args(["--name", "n", "--steps", "2"]),
                     base={"steps": 9}).steps == 2


def test_check_mapping_types_and_keys():
    got = check_mapping(_Toy, {"name": "n", "rate": 1, "tags": "one", "steps": None}, "t")
    assert got == {"name": "n", "rate": 1, "tags": ["one"], "steps": None}
    for bad, msg in [({"rate": True}, "t.rate: expected a number, got True"),
                     ({"steps": 1.5}, "t.steps: expected an integer or null, got 1.5"),
                     ({"name": None}, "t.name: expected a string, got null"),
                     ({"files": ["x", 3]}, "t.files: expected a list of strings"),
                     ({"local": "x"}, "unknown config key t.local (allowed: name, rate, steps, "
                                      "tags, files, keep, fast, mode, secret)"),
                     ({"secret": "1"}, "t.secret: expected an integer, got '1'")]:
        with pytest.raises(ConfigError) as e:
            check_mapping(_Toy, bad, "t")
        assert str(e.value).startswith(msg), (bad, str(e.value))
    with pytest.raises(ConfigError, match="unknown config key t.rate"):
        check_mapping(_Toy, {"rate": 1.0}, "t", skip=("rate",))
    assert check_mapping(_Toy, {"other": 1}, "t", extra=("other",)) == {"other": 1}
    with pytest.raises(ConfigError, match="^t: expected a mapping, got list$"):
        check_mapping(_Toy, [1], "t")


def test_build_names_the_key_of_a_field_error():
    with pytest.raises(ConfigError, match=r"^a\.b\.rate: must be >= 0, got -1$"):
        from_mapping(_Toy, {"name": "n", "rate": -1}, "a.b")
    with pytest.raises(ConfigError, match=r"^a\.b: mode y needs steps$"):
        build(_Toy, {"name": "n", "mode": "y"}, "a.b")
    assert from_mapping(_Toy, {"name": "n"}, "a", steps=4).steps == 4


def test_list_defaults_are_not_shared():
    a, b = _Toy(name="a"), _Toy(name="b")
    a.tags.append("z")
    assert b.tags == ["a"] and _Toy(name="c").tags == ["a"]


def test_step_keys_of_a_run_config_are_stable(tmp_path):
    """The options a run hashes into its step manifests (derive, score, eval) hash as they did
    when each config was spelled by hand, so a finished run directory is not redone after an
    upgrade. The digests are those of the hand-spelled layout on this config."""
    from safepatch_merge.config_fields import yaml_values
    from safepatch_merge.pipeline.stages import canonical_hash

    raw = {"backbone": "/b", "data": "/d.jsonl",
           "derive": {"heldout": 0, "lora_target": "q_proj",
                      "se": {"nll_ceiling": 8, "objective": "npo"}},
           "score": {"saliency_on": "questions"}, "eval": {"suites": ["xstest"], "limit": 4}}
    (st,) = parse_run_config(raw, "/").stages
    got = [canonical_hash(dataclasses.asdict(st.derive["se"]))[:16],
           canonical_hash(dataclasses.asdict(st.derive["osm"]))[:16],
           canonical_hash(dataclasses.asdict(st.score["se"]))[:16],
           canonical_hash(yaml_values(st.eval))[:16]]
    assert got == ["6a48ac492a43a9f6", "e5748a63a816dd29", "c8baefca0845b193",
                   "5944fd4e0a2ad323"]
