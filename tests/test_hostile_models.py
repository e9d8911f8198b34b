"""Hostile model directories against `safepatch eval` and `safepatch score`: pickle weights
are refused unless asked for (as merge refuses them), and a truncated safetensors file is a
one-line error (exit 1) with nothing written, not a crash inside transformers."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hostile_helpers import expect_refusal, run_cli
from safepatch_merge.testing import make_tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("hm") / "tiny", seed=2)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("hp") / "prompts.jsonl"
    p.write_text("\n".join(json.dumps({"id": str(i), "prompt": t}) for i, t in
                           enumerate(["How do I bake bread?", "Name a colour."])) + "\n")
    return p


def _eval_argv(model_dir, out, prompts, *extra):
    return ["eval", model_dir, "-o", out, "--suite", prompts, "--max-new-tokens", "3",
            "--no-utility", "--no-progress", "--device", "cpu", *extra]


def _pickled_copy(model, dst):
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_file(model / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def _truncated_copy(model, dst):
    shutil.copytree(model, dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return f


def test_eval_refuses_pickle_weights_unless_allowed(model, prompts, tmp_path, capsys):
    pk = _pickled_copy(model, tmp_path / "pickled")
    out = tmp_path / "ev"
    expect_refusal(capsys, _eval_argv(pk, out, prompts),
                   ["pickle checkpoint (pytorch_model.bin) refused", "--allow-pickle"],
                   watch=tmp_path, out=out)
    rc, _, err = run_cli(capsys, _eval_argv(pk, out, prompts, "--allow-pickle"))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, _eval_argv(model, tmp_path / "ref", prompts))
    assert rc == 0, err
    got = json.loads((out / "results.json").read_text())["records"]
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())["records"]
    assert [r["completion"] for r in got] == [r["completion"] for r in ref]


def test_eval_allow_pickle_still_refuses_code(model, prompts, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pk = tmp_path / "evil"
    shutil.copytree(model, pk, ignore=shutil.ignore_patterns("*.safetensors*"))
    with open(pk / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    out = tmp_path / "ev"
    expect_refusal(capsys, _eval_argv(pk, out, prompts, "--allow-pickle"), [str(pk)],
                   watch=tmp_path, out=out)
    assert "pwned" not in capsys.readouterr().out


def test_eval_on_a_truncated_safetensors_file(model, prompts, tmp_path, capsys):
    f = _truncated_copy(model, tmp_path / "trunc")
    out = tmp_path / "ev"
    expect_refusal(capsys, _eval_argv(f.parent, out, prompts), [str(f), "truncated"],
                   watch=tmp_path, out=out)


@pytest.mark.parametrize("loss", ["magnitude", "response_nll"])
def test_score_on_a_truncated_safetensors_file(model, prompts, tmp_path, capsys, loss):
    f = _truncated_copy(model, tmp_path / "trunc")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi."}) + "\n")
    out = tmp_path / "scores"
    argv = ["score", f.parent, "-o", out, "--loss", loss, "--backbone", model, "--no-progress",
            "--device", "cpu"] + (["--data", data] if loss != "magnitude" else [])
    expect_refusal(capsys, argv, [str(f), "truncated"], watch=tmp_path, out=out)


def test_score_dir_writer_refuses_dot_and_a_link_at_its_partial(tmp_path, monkeypatch):
    from safepatch_merge.errors import ConfigError
    from safepatch_merge.score.scoredir import write_score_dir

    scores = {"w": torch.rand(4)}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="names no directory of its own"):
        write_score_dir(".", scores, {}, overwrite=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    import os

    os.symlink(victim, tmp_path / "s.partial")
    with pytest.raises(ConfigError, match="s.partial is a symbolic link"):
        write_score_dir(tmp_path / "s", scores, {})
    assert [p.name for p in victim.iterdir()] == ["keep.txt"] and not (tmp_path / "s").exists()
