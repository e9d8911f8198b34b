"""Streaming merge == in-memory merge, bit for bit, for every mode; output loads and generates;
tiny memory budgets give the same bytes; same config and seed give byte-identical files."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import requires_cuda
from merge_helpers import (ENGINE_CASES as CASES, build_inputs, dir_bytes, in_memory_merge,
                           load_dir, write_config)
from safepatch_merge.merge import merge



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("merge_inputs"))


def _assert_same(out_dir, expected):
    got = load_dir(out_dir)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8) if t.dtype == torch.bool else
                           got[name].contiguous().view(torch.int16 if t.element_size() == 2
                                                       else torch.int32),
                           t.contiguous().view(torch.int16 if t.element_size() == 2
                                               else torch.int32)), name


@pytest.mark.parametrize("label,params", CASES, ids=[c[0] for c in CASES])
def test_streaming_equals_in_memory(inputs, tmp_path, monkeypatch, label, params):
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "1000")  # several row chunks per tensor
    cfg = write_config(tmp_path / "c.yaml", inputs, params,
                       output={"max_shard_size": "30KB"})
    res = merge(cfg, tmp_path / "out", max_memory="1MB")
    assert res.plan.chunk_elements == 1000
    expected = in_memory_merge(inputs, params)
    _assert_same(tmp_path / "out", expected)
    base = load_dir(inputs["base"])
    changed = sum(int((expected[n] != base[n]).sum()) for n in base)
    if label == "zero-rates":
        assert changed == 0
    else:
        assert changed > 0
    assert not (tmp_path / "out.partial").exists()


def test_budget_does_not_change_bytes(inputs, tmp_path, monkeypatch):
    params = {"top_rate_se": 0.2, "top_rate_osm": 0.2, "retention": 0.5, "rescale": True}
    cfg = write_config(tmp_path / "c.yaml", inputs, params, output={"max_shard_size": "30KB"})
    merge(cfg, tmp_path / "big")
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "37")
    res = merge(cfg, tmp_path / "small", max_memory="1KB")
    assert res.plan.chunk_elements == 37
    assert dir_bytes(tmp_path / "big") == dir_bytes(tmp_path / "small")


def test_delta_patches_and_output_dtype(inputs, tmp_path):
    base = load_dir(inputs["base"])
    deltas = {}
    for side in ("se", "osm"):
        full = load_dir(inputs[side])
        d = tmp_path / f"delta_{side}"
        d.mkdir()
        from safetensors.torch import save_file
        save_file({n: (full[n].float() - base[n].float()) for n in full}, str(d / "model.safetensors"))
        deltas[side] = d
    paths = {**inputs, "se": deltas["se"], "osm": deltas["osm"]}
    params = {"top_rate_se": 0.3, "top_rate_osm": 0.2}
    cfg = write_config(tmp_path / "c.yaml", paths, params, patches={"format": "delta"},
                       output={"dtype": "float32"})
    merge(cfg, tmp_path / "out")
    _assert_same(tmp_path / "out", in_memory_merge(paths, params, "delta", torch.float32))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_include_exclude(inputs, tmp_path):
    params = {"top_rate_se": 0.5, "top_rate_osm": 0.5}
    cfg = write_config(tmp_path / "c.yaml", inputs, params, include=["model.layers.*"],
                       exclude=["*.mlp.*"])
    merge(cfg, tmp_path / "out")
    got, base = load_dir(tmp_path / "out"), load_dir(inputs["base"])
    for n in base:
        same = torch.equal(got[n], base[n])
        if n.startswith("model.layers.") and ".mlp." not in n and "norm" not in n:
            assert not same, n
        else:
            assert same, n


def test_output_is_a_loadable_model_and_deterministic(inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = {"top_rate_se": 0.2, "top_rate_osm": 0.2, "retention": 0.8, "seed": 3}
    cfg = write_config(tmp_path / "c.yaml", inputs, params, output={"max_shard_size": "30KB"})
    merge(cfg, tmp_path / "a")
    merge(cfg, tmp_path / "b")
    a, b = dir_bytes(tmp_path / "a"), dir_bytes(tmp_path / "b")
    assert a == b
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json", "README.md", "safepatch_provenance.json"):
        assert f in a, f
    assert sum(f.endswith(".safetensors") for f in a) > 1
    card = a["README.md"].decode()
    assert "tags:" in card and "safepatch" in card and "density" in card
    assert "paper (arXiv 2405.13820) publishes none" in card
    prov = json.loads(a["safepatch_provenance.json"])
    assert prov["seed"] == 3 and prov["result"]["parameters"]["retention"] == 0.8
    assert prov["result"]["selection"]["se"]["density"] >= 0.2
    assert set(prov["inputs"]) == {"base", "patch_se", "patch_osm", "scores_se", "scores_osm"}

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.chat_template
    expected = in_memory_merge(inputs, params)
    sd = model.state_dict()
    for n, t in expected.items():
        assert torch.equal(sd[n], t), n
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5 or out[0, -1] == tok.eos_token_id


def test_missing_histograms_are_computed_and_bf16_scores(tmp_path):
    paths = build_inputs(tmp_path / "in", score_dtype=torch.bfloat16)
    (paths["scores_osm"] / "histograms.safetensors").unlink()
    params = {"top_rate_se": 0.15, "top_rate_osm": 0.35}
    cfg = write_config(tmp_path / "c.yaml", paths, params)
    res = merge(cfg, tmp_path / "out")
    _assert_same(tmp_path / "out", in_memory_merge(paths, params))
    assert not (paths["scores_osm"] / "histograms.safetensors").exists()  # input untouched
    assert res.summary["selection"]["osm"]["density"] >= 0.35


def test_dry_run_writes_nothing(inputs, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", inputs, {"top_rate_se": 0.2})
    res = merge(cfg, tmp_path / "out", dry_run=True)
    assert res.out_dir is None
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    plan = res.plan
    assert plan.tensors == len(load_dir(inputs["base"]))
    assert plan.patched_tensors < plan.tensors  # norms are unscored
    assert plan.summary["selection"]["se"]["groups"]["*"]["k"] > 0
    assert plan.estimated_peak_memory > 0 and plan.read_bytes > plan.write_bytes


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cuda_device_matches_cpu(inputs, tmp_path, monkeypatch, backend):
    """--device cuda (pinned read slots, copy stream) gives the CPU result within one bf16
    rounding step (backends may contract FMAs differently) and identical unpatched tensors."""
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "100")
    params = {"top_rate_se": 0.2, "top_rate_osm": 0.3, "retention": 0.7, "rescale": True}
    cfg = write_config(tmp_path / "c.yaml", inputs, params, output={"max_shard_size": "30KB"})
    merge(cfg, tmp_path / "cpu", backend=backend if backend == "reference" else None)
    merge(cfg, tmp_path / "gpu", device="cuda", max_memory="1KB",
          backend=backend if backend == "reference" else None)
    a, b = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "gpu")
    base = load_dir(inputs["base"])
    for n in a:
        d = (a[n].view(torch.int16).int() - b[n].view(torch.int16).int()).abs()
        assert int(d.max()) <= 1, n
        if "norm" in n:
            assert torch.equal(b[n], base[n]), n


@requires_cuda
@pytest.mark.gpu
def test_cuda_device_cache_keeps_the_result(inputs, tmp_path, monkeypatch):
    """With room to keep the refined fp32 scores on the GPU, the merge pass reads fewer bytes
    and writes the same files as without the cache."""
    from safepatch_merge.merge import engine

    monkeypatch.setattr(engine, "MAX_CHUNK", 300)
    params = {"top_rate_se": 0.2, "top_rate_osm": 0.3, "retention": 0.7, "rescale": True}
    cfg = write_config(tmp_path / "c.yaml", inputs, params, output={"max_shard_size": "30KB"})
    plain = merge(cfg, tmp_path / "plain", device="cuda", max_memory="1KB")
    kept = merge(cfg, tmp_path / "kept", device="cuda", max_memory="8GiB")
    assert plain.plan.device_cache_bytes == 0 < kept.plan.device_cache_bytes
    assert kept.bytes_read < plain.bytes_read
    assert dir_bytes(tmp_path / "plain") == dir_bytes(tmp_path / "kept")
