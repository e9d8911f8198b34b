"""Classic merges through the streaming engine on tiny sharded models: equal to the
independent whole-tensor reference, byte-identical under different memory budgets (chunked
tensors take the multi-pass statistics path), loadable with from_pretrained."""
import json

import pytest
import torch
from classic_reference import reference_merge
from merge_helpers import load_dir

from safepatch_merge.merge import merge
from safepatch_merge.merge.mergekit_config import parse_classic_section
from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("classic")
    m, tok = make_tiny_model(0, hidden_size=32, num_layers=2, intermediate_size=64,
                             dtype=torch.bfloat16)
    save_model_dir(m, tok, root / "base", max_shard_size="40KB")
    for i in range(3):
        save_model_dir(perturbed_copy(m, 0.02, seed=i + 1), tok, root / f"ft{i}",
                       max_shard_size="40KB")
    return root


def _cfg(root, method, seed=5, **glob):
    models = [{"model": str(root / "ft0"), "parameters": {"weight": 0.6, "density": 0.3}},
              {"model": str(root / "ft1"), "parameters": {"weight": 0.5, "density": 0.55}},
              {"model": str(root / "ft2"), "parameters": {"weight": -0.2, "density": 0.9}}]
    cfg = {"method": method, "backbone": str(root / "base"), "models": models, "seed": seed}
    if glob:
        cfg["parameters"] = glob
    return cfg


@pytest.mark.parametrize("method,glob", [
    ("task_arithmetic", {}), ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {}), ("ties", {"rescale": True, "normalize": False}),
    ("dare_ties", {}), ("dare_linear", {"rescale": False}),
])
def test_engine_equals_reference_under_any_budget(models, tmp_path, monkeypatch, method, glob):
    cfg = _cfg(models, method, **glob)
    big = merge(cfg, tmp_path / "big", max_memory="4GiB")
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "700")  # embeddings/MLPs in many chunks
    small = merge(cfg, tmp_path / "small", max_memory="1KB")
    assert small.plan.chunk_elements == 700 < big.plan.chunk_elements
    for f in sorted(p.name for p in (tmp_path / "big").glob("*.safetensors")):
        assert (tmp_path / "big" / f).read_bytes() == (tmp_path / "small" / f).read_bytes(), f

    out = load_dir(tmp_path / "big")
    base = load_dir(models / "base")
    fts = [load_dir(models / f"ft{i}") for i in range(3)]
    plan = parse_classic_section(method, cfg["backbone"], cfg["models"], cfg.get("parameters"))
    assert sorted(out) == sorted(base)
    for name, b in base.items():
        p = plan.tensor_params(name)
        ref = reference_merge(method, name, b, [f[name] for f in fts], list(p.weights),
                              list(p.densities), normalize=p.normalize, rescale=p.rescale,
                              lam=p.lam, seed=5)
        if p.rescale and method != "task_arithmetic":  # L1 factor: exact vs float64 sums
            torch.testing.assert_close(out[name].float(), ref.float(), rtol=0.0079, atol=1e-6)
        else:
            assert torch.equal(out[name], ref), name
        if method != "task_arithmetic":
            assert not torch.equal(out[name], b)


def test_output_loads_and_records_the_method(models, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(models, "ties")
    cfg["output"] = {"dtype": "float32"}
    merge(cfg, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    sd = load_dir(tmp_path / "out")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), sd[name])
        assert p.dtype == torch.float32
    prov = json.loads((tmp_path / "out" / "safepatch_provenance.json").read_text())
    assert prov["method"] == "ties"
    assert prov["result"]["parameters"]["normalize"] == "True (mergekit default)"
    assert 0.29 < prov["result"]["trim_target_density"]["model_0"] <= 0.3
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ties" in card and "mergekit 0.1.5's for this method" in card
    trim = prov["result"]["trim"]["model_0"]
    assert trim["kept"] == trim["k"] and f"| model_0 | {trim['k']} | {trim['kept']} |" in card
    assert "publishes none" not in card  # that note is SafePatching's, not mergekit's


def test_ties_keeps_exactly_k_per_tensor_under_any_budget(models, tmp_path, monkeypatch):
    """The recorded kept counts are mergekit's k per tensor (or the tensor's non-zero deltas
    where fewer), summed, the same whether tensors are streamed whole or in 700-element chunks,
    and the merged bytes are identical (bf16 deltas tie at the threshold)."""
    from safepatch_merge.merge.classic.trim import trim_count

    cfg = _cfg(models, "ties")
    merge(cfg, tmp_path / "big", max_memory="4GiB")
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "700")
    merge(cfg, tmp_path / "small", max_memory="1KB")
    base = load_dir(models / "base")
    fts = [load_dir(models / f"ft{i}") for i in range(3)]
    ks, kept = [], []
    for ft, dens in zip(fts, (0.3, 0.55, 0.9)):
        k = {n: trim_count(dens, b.numel()) for n, b in base.items() if b.is_floating_point()}
        ks.append(sum(k.values()))
        kept.append(sum(min(k[n], int((ft[n].float() != base[n].float()).sum())) for n in k))
    assert kept[2] < ks[2]  # some tensors have fewer non-zero deltas than k at density 0.9
    n = sum(b.numel() for b in base.values() if b.is_floating_point())
    for out in ("big", "small"):
        trim = json.loads((tmp_path / out / "safepatch_provenance.json").read_text()
                          )["result"]["trim"]
        assert [trim[f"model_{i}"]["kept"] for i in range(3)] == kept
        assert [trim[f"model_{i}"]["k"] for i in range(3)] == ks
        assert trim["model_0"]["n"] == n and trim["model_0"]["density"] == kept[0] / n
    for f in sorted(p.name for p in (tmp_path / "big").glob("*.safetensors")):
        assert (tmp_path / "big" / f).read_bytes() == (tmp_path / "small" / f).read_bytes(), f


def test_missing_tensor_in_a_model_is_an_error_naming_it(models, tmp_path):
    from safetensors.torch import save_file

    from safepatch_merge.errors import CheckpointError

    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_dir(models / "ft0")
    sd.pop("model.norm.weight")
    save_file(sd, str(bad / "model.safetensors"))
    cfg = _cfg(models, "task_arithmetic")
    cfg["models"][0]["model"] = str(bad)
    with pytest.raises(CheckpointError, match=r"model_0 .*'model.norm.weight' is missing"):
        merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
