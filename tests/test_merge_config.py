"""Config schema validation, Hub-id resolution, tied embeddings, dry run from the CLI."""
from __future__ import annotations

import pytest
import torch

from merge_helpers import in_memory_merge, load_dir, write_scores
from safepatch_merge.errors import CheckpointError, ConfigError
from safepatch_merge.merge import parse_config
from safepatch_merge.merge import defaults
from safepatch_merge.merge.config import parse_size
from safepatch_merge.ops import radix_histogram  # noqa: F401 - imported for write_scores users

BASE = {"backbone": "b", "patches": {"se": "s", "osm": "o"}, "scores": {"se": "x", "osm": "y"}}


def test_defaults_live_in_one_place():
    cfg = parse_config(dict(BASE))
    from safepatch_merge.merge.safepatch_method import SafepatchMethod

    m = SafepatchMethod(cfg)
    s = m.summary()["parameters"]
    assert s == {"top_rate_se": defaults.TOP_RATE_SE, "top_rate_osm": defaults.TOP_RATE_OSM,
                 "alpha": defaults.ALPHA, "beta": defaults.BETA, "retention": defaults.RETENTION,
                 "retention_order": defaults.RETENTION_ORDER, "rescale": defaults.RESCALE, "mask_mode": defaults.MASK_MODE,
                 "granularity": defaults.GRANULARITY, "seed": defaults.SEED,
                 "patch_format": defaults.PATCH_FORMAT, "nonfinite": defaults.NONFINITE_PATCH}
    assert cfg.output.dtype == "auto" and cfg.output.max_shard_size == 5_000_000_000


@pytest.mark.parametrize("raw,needle", [
    ({**BASE, "paches": {}}, "unknown config key paches"),
    ({**BASE, "output": {"dtype": "auto", "shard": 1}}, "unknown config key output.shard"),
    ({**BASE, "patches": {"se": "s", "fmt": "delta"}}, "unknown config key patches.fmt"),
    ({**BASE, "parameters": {"alpha": float("nan")}}, "parameters.alpha"),
    ({**BASE, "parameters": {"top_rate_se": 1.01}}, "out of range"),
    ({**BASE, "parameters": {"retention": 0.0, "rescale": True}}, "rescale"),
    ({**BASE, "parameters": {"mask_mode": "union"}}, "parameters.mask_mode"),
    ({**BASE, "parameters": {"granularity": "block"}}, "parameters.granularity"),
    ({**BASE, "parameters": {"retention_order": "before"}},
     "parameters.retention_order: expected one of after_selection, before_selection"),
    ({**BASE, "parameters": {"seed": -1}}, "parameters.seed"),
    ({**BASE, "parameters": {"seed": True}}, "parameters.seed"),
    ({**BASE, "scores": {"se": "x"}}, "scores.osm: required"),
    ({**BASE, "patches": {}}, "at least one"),
    ({**BASE, "method": "frobnicate"}, "unknown merge method 'frobnicate'"),
    ({**BASE, "output": {"max_shard_size": "5 parsecs"}}, "output.max_shard_size"),
    ({**BASE, "include": [3]}, "include"),
    ({k: v for k, v in BASE.items() if k != "backbone"}, "backbone"),
])
def test_bad_configs(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        parse_config(raw)


def test_mode_none_needs_no_scores():
    cfg = parse_config({"backbone": "b", "patches": {"se": "s"},
                        "parameters": {"mask_mode": "none"}})
    assert dict(cfg.params.patches) == {"se": "s"} and dict(cfg.params.scores) == {}


@pytest.mark.parametrize("text,n", [("5GB", 5_000_000_000), ("512MiB", 512 << 20),
                                    ("1.5kB", 1500), (4096, 4096), ("2 GiB", 2 << 30),
                                    ("100", 100)])
def test_parse_size(text, n):
    assert parse_size(text, "k") == n


def test_hub_ids_resolve_through_the_cache(tmp_path, monkeypatch):
    from safepatch_merge.io import checkpoint, hub
    import huggingface_hub

    from safepatch_merge.testing import make_tiny_model_dir

    local = make_tiny_model_dir(tmp_path / "snap")
    calls = []

    def fake(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        if repo_id == "org/missing":
            raise FileNotFoundError("not in cache")
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ck = checkpoint.open_checkpoint("org/tiny", "backbone", revision="main")
    assert calls[0][:2] == ("org/tiny", "main") and "*.safetensors" in calls[0][2]
    assert not any(p.endswith((".bin", ".py")) for p in calls[0][2])
    assert ck.root == local and "lm_head.weight" in ck.tensors
    with pytest.raises(CheckpointError, match="backbone org/missing: .*Hub"):
        checkpoint.open_checkpoint("org/missing", "backbone")
    assert hub.ALLOW_PATTERNS


def test_tied_embeddings_written_once_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    from safepatch_merge.merge import merge
    from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir

    model, tok = make_tiny_model(0, tie_word_embeddings=True)
    paths = {"base": save_model_dir(model, tok, tmp_path / "base")}
    pm = perturbed_copy(model, 0.02, seed=1)
    paths["se"] = save_model_dir(pm, tok, tmp_path / "se")
    sd = load_dir(paths["se"])
    assert "lm_head.weight" not in sd  # tied: saved once
    g = torch.Generator().manual_seed(0)
    paths["scores_se"] = write_scores(tmp_path / "sc", {n: torch.rand(t.shape, generator=g)
                                                        for n, t in sd.items()})
    cfg = {"backbone": str(paths["base"]), "patches": {"se": str(paths["se"])},
           "scores": {"se": str(paths["scores_se"])}, "parameters": {"top_rate_se": 0.5}}
    merge(cfg, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    assert set(got) == set(load_dir(paths["base"]))
    expected = in_memory_merge({k: paths[k] for k in ("base", "se", "scores_se")},
                               {"top_rate_se": 0.5})
    for n, t in expected.items():
        assert torch.equal(got[n], t), n
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(m2.lm_head.weight, got["model.embed_tokens.weight"])


def test_cli_dry_run_prints_plan(tmp_path, capsys):
    from safepatch_merge.cli import main
    from safepatch_merge.testing import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "b")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"backbone: {base}\npatches: {{se: {base}}}\nparameters: {{mask_mode: none}}\n")
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tensors: " in out and "estimated peak" in out and "read:" in out
    assert not (tmp_path / "o").exists()


def test_cli_stats_account_for_the_merge(tmp_path, capsys):
    """--stats writes where the time went: the main thread's stages add up to the merge's
    seconds, and the bytes read match the inputs."""
    import json

    from safepatch_merge.cli import main
    from safepatch_merge.testing import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "b")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"backbone: {base}\npatches: {{se: {base}}}\nparameters: {{mask_mode: none}}\n")
    stats = tmp_path / "stats.json"
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--no-progress", "--stats",
                 str(stats)]) == 0
    assert "stages: open " in capsys.readouterr().out
    doc = json.loads(stats.read_text())
    st = doc["stages"]
    top = sum(v for k, v in st.items() if "." not in k)
    assert {"open", "load_ops", "prepass", "stream", "finish"} <= set(st)
    assert 0.5 * doc["seconds"] <= top <= doc["seconds"] + 0.01
    assert st["stream.compute"] <= st["stream"]
    assert doc["bytes_read"] == doc["plan"]["read_bytes"]  # mode none: no pre-pass reads
    assert doc["prepass_bytes_read"] == 0


def test_config_choices_match_what_the_ops_and_selector_accept():
    from safepatch_merge import ops
    from safepatch_merge.merge import select

    assert defaults.MASK_MODES == ops.MODES
    assert defaults.RETENTION_ORDERS == ops.RETENTION_ORDERS
    assert defaults.GRANULARITIES == select.GRANULARITIES


def test_parsed_config_is_immutable():
    import dataclasses

    cfg = parse_config({"backbone": "b", "patches": {"se": "s"}, "scores": {"se": "t"},
                        "include": ["model.*"]})
    assert cfg.include == ("model.*",) and cfg.params.top_rate["se"] == defaults.TOP_RATE_SE
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backbone = "other"
    with pytest.raises(TypeError):
        cfg.params.patches["osm"] = "x"
