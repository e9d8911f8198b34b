"""Confinement: frozen tensors come out of derive byte-identical to the backbone's, for every
objective, full-parameter and LoRA; the trainable ones move."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from derive_helpers import tiny_setup
from safepatch_merge.derive.confine import confine, stored_name
from safepatch_merge.derive.train import DeriveConfig, derive_patch
from safepatch_merge.errors import ConfigError
from safepatch_merge.testing import make_tiny_model

BASE = dict(learning_rate=1e-2, max_steps=2, batch_size=2, heldout=0.0, max_length=96, seed=0)
FREEZE = ["model.embed_tokens.*", "lm_head.*", "*norm*"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("confine")
    bb, data = tiny_setup(root)
    retain = root / "retain.jsonl"
    retain.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i} " * 3}) + "\n"
                              for i in range(4)))
    return bb, data, retain


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("objective", ["ga", "npo", "graddiff", "refusal_sft", "gd"])
def test_frozen_tensors_are_byte_identical(setup, tmp_path, objective):
    bb, data, retain = setup
    extra = {"retain_data": str(retain)} if objective == "graddiff" else {}
    rec = derive_patch(bb, data, tmp_path / "p", progress=False, config=DeriveConfig(
        objective=objective, train_exclude=FREEZE, **BASE, **extra))
    base, got = load_file(bb / "model.safetensors"), load_file(tmp_path / "p/model.safetensors")
    frozen = {k for k in base if "norm" in k or k.startswith(("model.embed_tokens", "lm_head"))}
    assert set(rec["confinement"]["frozen_tensors"]) == frozen and len(frozen) == 2 + 2 * 2 + 1
    for k in base:
        if k in frozen:
            assert _same_bytes(got[k], base[k]), k
        else:
            assert not torch.equal(got[k], base[k]), k
    assert rec["trainable_parameters"] == sum(base[k].numel() for k in base if k not in frozen)
    assert rec["confinement"]["frozen"] == sum(base[k].numel() for k in frozen)


def test_include_trains_only_the_matching_tensors(setup, tmp_path):
    bb, data, _ = setup
    derive_patch(bb, data, tmp_path / "p", progress=False, config=DeriveConfig(
        objective="ga", train_include=["model.layers.1.mlp.*"], **BASE))
    base, got = load_file(bb / "model.safetensors"), load_file(tmp_path / "p/model.safetensors")
    for k in base:
        assert torch.equal(got[k], base[k]) == (not k.startswith("model.layers.1.mlp.")), k


def test_lora_adapters_of_excluded_layers_stay_zero(setup, tmp_path):
    bb, data, _ = setup
    rec = derive_patch(bb, data, tmp_path / "p", progress=False, config=DeriveConfig(
        objective="ga", lora=True, lora_r=2, train_exclude=["*.self_attn.*"], **BASE))
    base, got = load_file(bb / "model.safetensors"), load_file(tmp_path / "p/model.safetensors")
    for k in base:
        if ".self_attn." in k or "norm" in k or "embed" in k or "lm_head" in k:
            assert _same_bytes(got[k], base[k]), k
        else:
            assert not torch.equal(got[k], base[k]), k
    ad = load_file(tmp_path / "p/adapter/adapter_model.safetensors")
    assert all(v.abs().max() == 0 for k, v in ad.items() if ".self_attn." in k and "lora_B" in k)
    assert rec["confinement"]["frozen_tensors"] == sorted(
        f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qkvo")


def test_tied_embeddings_freeze_together():
    model, _ = make_tiny_model(tie_word_embeddings=True)
    rep = confine(model, None, ["lm_head.*"])
    assert not model.model.embed_tokens.weight.requires_grad
    assert rep["frozen_tensors"] == ["lm_head.weight", "model.embed_tokens.weight"]


def test_names_and_errors(setup, tmp_path):
    assert stored_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") \
        == "model.layers.0.self_attn.q_proj.weight"
    assert stored_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") \
        == "model.layers.0.mlp.up_proj.weight"
    model, _ = make_tiny_model()
    with pytest.raises(ConfigError, match="matches no parameter"):
        confine(model, None, ["model.embed.*"])
    with pytest.raises(ConfigError, match="nothing to train"):
        confine(model, None, ["*"])
    bb, data, _ = setup
    with pytest.raises(ConfigError, match=re.escape("'*nrom*' matches no parameter")):
        derive_patch(bb, data, tmp_path / "x", DeriveConfig(train_exclude=["*nrom*"], **BASE),
                     progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
