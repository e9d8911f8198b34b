"""score_patch / the score directory format: names, shards, histograms, info; LoRA over the
merged weight; magnitude; errors leave nothing behind."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from derive_helpers import write_pairs
from safepatch_merge.errors import CheckpointError, ConfigError
from safepatch_merge.ops import radix_histogram
from safepatch_merge.score.api import ScoreConfig, score_patch
from safepatch_merge.score.scoredir import write_score_dir
from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir

CFG = dict(batch_size=3, max_length=96)


def _load_dir(d):
    idx = d / "model.safetensors.index.json"
    files = set(json.loads(idx.read_text())["weight_map"].values()) if idx.exists() else {"model.safetensors"}
    out = {}
    for f in files:
        out.update(load_file(d / f))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    model, tok = make_tiny_model(seed=2, tie_word_embeddings=True)
    bb = save_model_dir(model, tok, root / "bb")
    patch = save_model_dir(perturbed_copy(model, 0.02, seed=5), tok, root / "patch",
                           max_shard_size="40KB")
    return root, bb, patch, write_pairs(root / "pairs.jsonl")


def test_score_dir_format(dirs):
    root, bb, patch, data = dirs
    info = score_patch(patch, root / "s", data, backbone=bb, config=ScoreConfig(**CFG),
                       progress=False)
    out = root / "s"
    assert sorted(p.name for p in out.iterdir()) == ["histograms.safetensors", "model.safetensors",
                                                     "score_info.json"]
    with open(patch / "model.safetensors.index.json") as f:
        stored = json.load(f)["weight_map"]
    scores = _load_dir(out)
    assert set(scores) == set(stored) and "lm_head.weight" not in scores  # tied: stored once
    patched = _load_dir(patch)
    hist = load_file(out / "histograms.safetensors")
    for n, s in scores.items():
        assert s.dtype == torch.float32 and s.shape == patched[n].shape
        assert (s >= 0).all() and s.abs().sum() > 0
        assert hist[n].dtype == torch.int64 and hist[n].shape == (65536,)
        assert torch.equal(hist[n], radix_histogram(s, 0, 0))
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        assert h.metadata() == {"format": "pt"}
    assert info["format"] == "safepatch-scores" and info["version"] == 1
    assert info["loss"] == "response_nll" and info["accumulation"] == "signed"
    assert info["data"]["num_examples"] == 12 and info["num_batches"] == 4
    assert info["tensors"] == len(scores) and info["dtype"] == "float32"
    assert info["backbone"] == str(bb) and len(info["patch_sha256"]) == 64
    assert json.loads((out / "score_info.json").read_text()) == info


def test_sharded_bf16_scores_and_split(dirs):
    root, bb, patch, data = dirs
    score_patch(patch, root / "s32", data, config=ScoreConfig(**CFG), progress=False)
    score_patch(patch, root / "s16", data, progress=False,
                config=ScoreConfig(**CFG, score_dtype="bfloat16", max_shard_size="30KB"))
    idx = json.loads((root / "s16" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    a, b = _load_dir(root / "s32"), _load_dir(root / "s16")
    hist = load_file(root / "s16" / "histograms.safetensors")
    for n in a:
        assert b[n].dtype == torch.bfloat16
        assert torch.equal(b[n], a[n].to(torch.bfloat16))
        assert torch.equal(hist[n], radix_histogram(b[n], 0, 0))
    info = score_patch(patch, root / "sh", data, progress=False,
                       config=ScoreConfig(**CFG, split="heldout", heldout=0.3))
    assert info["data"]["num_examples"] == 4 and info["data"]["split"] == "heldout"


def test_magnitude(dirs):
    root, bb, patch, _ = dirs
    info = score_patch(patch, root / "mag", backbone=bb, config=ScoreConfig(loss="magnitude"),
                       progress=False)
    assert info["loss"] == "magnitude" and info["num_batches"] == 0
    s, p, b = _load_dir(root / "mag"), _load_dir(patch), load_file(bb / "model.safetensors")
    assert set(s) == set(p)
    for n in s:
        assert torch.equal(s[n], (p[n].float() - b[n].float()).abs())


def test_lora_scores_are_over_the_merged_weight(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = make_tiny_model(seed=3)
    bb = save_model_dir(model, tok, tmp_path / "bb")
    pm = get_peft_model(make_tiny_model(seed=3)[0], LoraConfig(r=2, lora_alpha=4,
                                                               target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload()
    save_model_dir(merged, tok, tmp_path / "merged")
    data = write_pairs(tmp_path / "d.jsonl")
    ia = score_patch(tmp_path / "adapter", tmp_path / "sa", data, backbone=bb,
                     config=ScoreConfig(**CFG), progress=False)
    score_patch(tmp_path / "merged", tmp_path / "sm", data, config=ScoreConfig(**CFG), progress=False)
    a, m = _load_dir(tmp_path / "sa"), _load_dir(tmp_path / "sm")
    assert set(a) == set(m) == set(load_file(bb / "model.safetensors"))
    for n in a:
        torch.testing.assert_close(a[n], m[n], rtol=1e-5, atol=1e-6 * float(m[n].abs().max()))
    assert ia["patch_kind"] == "lora_merged"
    # magnitude of an adapter: |B·A·scale| where targeted, 0 elsewhere
    score_patch(tmp_path / "adapter", tmp_path / "mag", backbone=bb,
                config=ScoreConfig(loss="magnitude"), progress=False)
    mag, base = _load_dir(tmp_path / "mag"), load_file(bb / "model.safetensors")
    mm = load_file(tmp_path / "merged" / "model.safetensors")
    for n in mag:
        torch.testing.assert_close(mag[n], (mm[n] - base[n]).abs(), rtol=0, atol=1e-7)
    # the adapter does not fit a backbone of another width: one-line error
    other, tok2 = make_tiny_model(seed=3, hidden_size=48)
    bb2 = save_model_dir(other, tok2, tmp_path / "bb2")
    with pytest.raises(CheckpointError, match="does not fit") as e:
        score_patch(tmp_path / "adapter", tmp_path / "bad", data, backbone=bb2,
                    config=ScoreConfig(**CFG), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_errors_leave_no_output(dirs, tmp_path):
    root, bb, patch, data = dirs
    bad = {"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(3)}
    with pytest.raises(CheckpointError, match="tensor a"):
        write_score_dir(tmp_path / "nan", bad, {})
    assert not (tmp_path / "nan").exists() and not (tmp_path / "nan.partial").exists()
    with pytest.raises(CheckpointError, match="tensor b.*negative"):
        write_score_dir(tmp_path / "neg", {"b": -torch.ones(2)}, {})
    with pytest.raises(CheckpointError, match="tensor c"):  # fp16 overflow
        write_score_dir(tmp_path / "big", {"c": torch.tensor([1e6])}, {}, dtype="float16")
    with pytest.raises(ConfigError, match="needs the backbone"):
        score_patch(patch, tmp_path / "m", config=ScoreConfig(loss="magnitude"))
    with pytest.raises(ConfigError, match="needs scoring data"):
        score_patch(patch, tmp_path / "m", backbone=bb)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        score_patch(patch, tmp_path / "exists", data)
    # a diverged patch (NaN weights) is refused, nothing written
    model, tok = make_tiny_model(seed=2)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    nanp = save_model_dir(model, tok, tmp_path / "nanpatch")
    with pytest.raises(CheckpointError, match="not finite"):
        score_patch(nanp, tmp_path / "ns", data, config=ScoreConfig(**CFG), progress=False)
    assert not (tmp_path / "ns").exists()
