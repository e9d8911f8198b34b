"""derive -> score -> merge from the command line on a tiny model gives a loadable model whose
every weight is the backbone's or the backbone's plus one patch's delta."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from derive_helpers import tiny_setup
from safepatch_merge.cli import main


def _tensors(d):
    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _near(m, x, b):
    # fl(b + fl(x − b)): within an ulp of the larger of |b| and |x|
    return (m - x).abs() <= 2.4e-7 * torch.maximum(b.abs(), x.abs())


def test_derive_score_merge_chain(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bb, data = tiny_setup(tmp_path)
    common = ["--data", str(data), "--lr", "1e-2", "--max-steps", "3", "--batch-size", "2",
              "--max-length", "96", "--heldout", "0.3", "--no-progress"]
    assert main(["derive", str(bb), "--objective", "ga", "-o", str(tmp_path / "se"), *common]) == 0
    assert main(["derive", str(bb), "--objective", "gd", "-o", str(tmp_path / "osm"), "--lora",
                 "--lora-r", "4", *common]) == 0
    for side in ("se", "osm"):
        assert main(["score", str(tmp_path / side), "--data", str(data), "-o",
                     str(tmp_path / f"s_{side}"), "--batch-size", "5", "--max-length", "96",
                     "--no-progress"]) == 0
        info = json.loads((tmp_path / f"s_{side}" / "score_info.json").read_text())
        assert info["backbone"] == str(bb.resolve())  # taken from derive_record.json
    # score buffers in host memory: the same score files
    assert main(["score", str(tmp_path / "se"), "--data", str(data), "-o", str(tmp_path / "s_host"),
                 "--batch-size", "5", "--max-length", "96", "--score-buffers", "host",
                 "--no-progress"]) == 0
    host, dev = _tensors(tmp_path / "s_host"), _tensors(tmp_path / "s_se")
    assert host.keys() == dev.keys() and all(torch.equal(host[k], dev[k]) for k in dev)
    cfg = {"backbone": str(bb),
           "patches": {"se": str(tmp_path / "se"), "osm": str(tmp_path / "osm")},
           "scores": {"se": str(tmp_path / "s_se"), "osm": str(tmp_path / "s_osm")},
           "parameters": {"top_rate_se": 0.2, "top_rate_osm": 0.2, "alpha": 1.0, "beta": 1.0}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
    base, se, osm = _tensors(bb), _tensors(tmp_path / "se"), _tensors(tmp_path / "osm")
    merged = {k: v for k, v in model.state_dict().items() if k in base}
    changed_se = changed_osm = 0
    for k, b in base.items():
        m = merged[k]
        # base + 1.0·(θ_X − base) in fp32 lands within one ulp of θ_X, not always on it
        is_b = m == b
        is_se, is_osm = (_near(m, se[k], b) & ~is_b), (_near(m, osm[k], b) & ~is_b)
        assert (is_b | is_se | is_osm).all(), k
        changed_se += int(is_se.sum())
        changed_osm += int(is_osm.sum())
    n = sum(b.numel() for b in base.values())
    assert 0 < changed_se <= 0.2 * n + 1 and 0 < changed_osm <= 0.2 * n + 1
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    capsys.readouterr()


def test_cli_errors_are_one_line(tmp_path, capsys):
    bb, data = tiny_setup(tmp_path)
    capsys.readouterr()
    rc = main(["derive", str(bb), "--data", str(data), "--objective", "ga", "-o",
               str(tmp_path / "x"), "--response-field", "answer"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and "no field 'answer'" in err
    rc = main(["score", str(tmp_path / "missing"), "--data", str(data), "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "not found" in err and err.count("\n") == 0
    assert not (tmp_path / "x").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("cmd", ["derive", "score"])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "examples:" in capsys.readouterr().out
