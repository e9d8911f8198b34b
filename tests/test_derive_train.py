"""Patch derivation on a tiny model: GA raises, GD lowers the held-out NLL; stop rules; LoRA;
outputs (checkpoint, record, curve); errors."""
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from derive_helpers import PAIRS, tiny_setup
from safepatch_merge.derive.dataset import file_sha256
from safepatch_merge.derive.train import DeriveConfig, derive_patch
from safepatch_merge.errors import ConfigError

BASE = dict(learning_rate=1e-2, max_steps=6, batch_size=2, heldout=0.3, eval_every=3,
            max_length=96, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("derive"))


@pytest.fixture(scope="module")
def ga_gd(setup, tmp_path_factory):
    bb, data = setup
    root = tmp_path_factory.mktemp("patches")
    ga = derive_patch(bb, data, root / "ga", DeriveConfig(objective="ga", **BASE), progress=False)
    gd = derive_patch(bb, data, root / "gd", DeriveConfig(objective="gd", **BASE), progress=False)
    return root, ga, gd


def test_ga_raises_and_gd_lowers_heldout_nll(ga_gd):
    _, ga, gd = ga_gd
    assert ga["initial_heldout_nll"] == pytest.approx(gd["initial_heldout_nll"], rel=1e-6)
    assert ga["final_heldout_nll"] > ga["initial_heldout_nll"] + 0.05
    assert gd["final_heldout_nll"] < gd["initial_heldout_nll"] - 0.05
    assert ga["stop_reason"] == gd["stop_reason"] == "max_steps" and ga["steps"] == 6


def test_outputs_record_and_curve(ga_gd, setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, ga, _ = ga_gd
    bb, data = setup
    out = root / "ga"
    rec = json.loads((out / "derive_record.json").read_text())
    assert rec["data"]["sha256"] == file_sha256(data)
    assert rec["data"]["num_pairs"] == len(PAIRS)
    assert rec["data"]["heldout_prompts"] == 2 and rec["data"]["train_prompts"] == 4
    assert rec["data"]["train_examples"] + rec["data"]["heldout_examples"] == len(PAIRS)
    assert rec["hyperparameters"]["learning_rate"] == 1e-2 and rec["seed"] == 0
    assert rec["throughput"]["tokens_per_s"] > 0 and rec["versions"]["torch"] == torch.__version__
    rows = list(csv.DictReader(open(out / "nll_curve.csv")))
    assert [int(r["step"]) for r in rows] == list(range(7))
    held = {int(r["step"]): float(r["heldout_nll"]) for r in rows if r["heldout_nll"]}
    assert sorted(held) == [0, 3, 6] and held[6] == pytest.approx(rec["final_heldout_nll"])
    assert all(r["train_nll"] for r in rows[:-1]) and (out / "nll_curve.png").stat().st_size > 0
    # a loadable HF model directory whose tokenizer keeps the chat template
    m = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    base = load_file(bb / "model.safetensors")
    patched = load_file(out / "model.safetensors")
    assert patched.keys() == base.keys()
    assert any(not torch.equal(patched[k], base[k]) for k in base)
    assert torch.equal(m.state_dict()["model.norm.weight"], patched["model.norm.weight"])


def test_same_seed_same_patch(ga_gd, setup, tmp_path):
    root, _, _ = ga_gd
    bb, data = setup
    derive_patch(bb, data, tmp_path / "again", DeriveConfig(objective="ga", **BASE), progress=False)
    a, b = load_file(root / "ga" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stop_on", ["train", "heldout"])
def test_nll_ceiling_stops_gradient_ascent(setup, tmp_path, stop_on):
    bb, data = setup
    cfg = DeriveConfig(objective="ga", **{**BASE, "max_steps": 40, "eval_every": 1},
                       nll_ceiling=5.9, stop_on=stop_on)
    rec = derive_patch(bb, data, tmp_path / "se", cfg, progress=False)
    assert rec["stop_reason"] == "nll_ceiling" and 0 < rec["steps"] < 40
    rows = list(csv.DictReader(open(tmp_path / "se" / "nll_curve.csv")))
    col = "train_nll" if stop_on == "train" else "heldout_nll"
    vals = [float(r[col]) for r in rows if r[col]]
    assert vals[-1] >= 5.9 and all(v < 5.9 for v in vals[:-1])


def test_nll_floor_stops_gradient_descent(setup, tmp_path):
    bb, data = setup
    cfg = DeriveConfig(objective="gd", **{**BASE, "max_steps": 40}, nll_floor=4.5)
    rec = derive_patch(bb, data, tmp_path / "osm", cfg, progress=False)
    assert rec["stop_reason"] == "nll_floor" and rec["steps"] < 40
    assert rec["final_train_nll"] <= 4.5


def test_lora_patch_merged_equals_its_delta(setup, tmp_path):
    bb, data = setup
    cfg = DeriveConfig(objective="gd", **{**BASE, "max_steps": 3}, lora=True, lora_r=4,
                       lora_alpha=8)
    rec = derive_patch(bb, data, tmp_path / "lora", cfg, progress=False)
    assert rec["kind"] == "lora"
    out = tmp_path / "lora"
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(bb.resolve())
    ad = load_file(out / "adapter" / "adapter_model.safetensors")
    base = load_file(bb / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == base.keys()
    scale = 8 / 4
    n_lora = 0
    for k in base:
        a_key = "base_model.model." + k.replace(".weight", ".lora_A.weight")
        if a_key in ad:
            n_lora += 1
            delta = ad[a_key.replace("lora_A", "lora_B")].double() @ ad[a_key].double() * scale
            assert delta.abs().max() > 0
            torch.testing.assert_close((merged[k].double() - base[k].double()), delta,
                                       rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[k], base[k]), k
    assert n_lora == 2 * 7  # q k v o gate up down in each of 2 layers
    assert rec["trainable_parameters"] == sum(v.numel() for v in ad.values())


def test_lora_adapter_only(setup, tmp_path):
    bb, data = setup
    cfg = DeriveConfig(objective="gd", **{**BASE, "max_steps": 1}, lora=True, lora_r=2,
                       save_merged=False)
    derive_patch(bb, data, tmp_path / "a", cfg, progress=False)
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert not (tmp_path / "a" / "model.safetensors").exists()


def test_errors(setup, tmp_path):
    bb, data = setup
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        derive_patch(bb, data, tmp_path / "exists", DeriveConfig(objective="ga"))
    with pytest.raises(ConfigError, match="nll_floor applies to descent objectives"):
        derive_patch(bb, data, tmp_path / "x", DeriveConfig(objective="ga", nll_floor=1.0))
    with pytest.raises(ConfigError, match="clipping"):
        derive_patch(bb, data, tmp_path / "x", DeriveConfig(objective="ga", max_grad_norm=0))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_precisions_in_one_process(setup, tmp_path):
    """fp32 then bf16 autocast then bf16 weights in one process (accelerate's state is reset);
    the checkpoint is saved in the training dtype unless asked otherwise."""
    bb, data = setup
    recs = {}
    for prec in ("fp32", "bf16-mixed", "bf16"):
        recs[prec] = derive_patch(bb, data, tmp_path / prec, progress=False,
                                  config=DeriveConfig(objective="gd", precision=prec,
                                                      **{**BASE, "max_steps": 2}))
    assert recs["bf16-mixed"]["throughput"]["mixed_precision"] == "bf16"
    assert recs["fp32"]["throughput"]["mixed_precision"] == "no"
    for prec, want in (("fp32", torch.float32), ("bf16-mixed", torch.float32), ("bf16", torch.bfloat16)):
        w = load_file(tmp_path / prec / "model.safetensors")["model.norm.weight"]
        assert w.dtype == want, prec
        assert recs[prec]["final_heldout_nll"] < recs[prec]["initial_heldout_nll"], prec
    rec = derive_patch(bb, data, tmp_path / "bf16out", progress=False,
                       config=DeriveConfig(objective="gd", save_dtype="bfloat16", **{**BASE, "max_steps": 1}))
    assert rec["save_dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf16out" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
