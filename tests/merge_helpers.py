"""Shared builders for the merge tests: tiny backbone + patches + score directories, a config
writer, and an in-memory merge that shares no code with the streaming engine but the ops."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from safepatch_merge.ops import masked_merge, radix_histogram
from safepatch_merge.merge.select import group_of, select_thresholds
from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (single file or sharded)."""
    path = Path(path)
    idx = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def write_scores(path: Path, scores: dict[str, torch.Tensor], shard: bool = True,
                 histograms: bool = True) -> Path:
    """A score directory (docs/design.md §3): optionally sharded in two, with histograms."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(scores)
    if shard and len(names) > 1:
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half],
                 "model-00002-of-00002.safetensors": names[half:]}
        for f, ns in parts.items():
            save_file({n: scores[n].contiguous() for n in ns}, str(path / f))
        wm = {n: f for f, ns in parts.items() for n in ns}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                        "weight_map": wm}))
    else:
        save_file({n: t.contiguous() for n, t in scores.items()}, str(path / "model.safetensors"))
    if histograms:
        save_file({n: radix_histogram(t.contiguous(), 0, 0) for n, t in scores.items()},
                  str(path / "histograms.safetensors"))
    (path / "score_info.json").write_text(json.dumps({"format": "safepatch-scores", "version": 1}))
    return path


def build_inputs(root: Path, dtype=torch.bfloat16, hidden: int = 32, layers: int = 2,
                 score_dtype=torch.float32, zero_frac: float = 0.05) -> dict[str, Path]:
    """base/, se/, osm/ (full patched, sharded) and scores_se/, scores_osm/ under root.
    Scores cover every parameter except the norms (so unscored tensors exist), with a few
    exact zeros and ties."""
    model, tok = make_tiny_model(0, hidden_size=hidden, num_layers=layers,
                                 intermediate_size=2 * hidden, dtype=dtype)
    paths = {"base": save_model_dir(model, tok, root / "base", max_shard_size="40KB")}
    for i, side in enumerate(("se", "osm")):
        pm = perturbed_copy(model, 0.02, seed=i + 1)
        paths[side] = save_model_dir(pm, tok, root / side, max_shard_size="40KB")
        g = torch.Generator().manual_seed(100 + i)
        sc = {}
        for n, p in pm.named_parameters():
            if "norm" in n:
                continue
            s = torch.rand(p.shape, generator=g)
            s = torch.round(s * 512) / 512  # ties
            s[torch.rand(p.shape, generator=g) < zero_frac] = 0.0
            sc[n] = s.to(score_dtype)
        paths[f"scores_{side}"] = write_scores(root / f"scores_{side}", sc)
    return paths


def write_config(path: Path, paths: dict, params: dict | None = None, **extra) -> Path:
    cfg = {"backbone": str(paths["base"]),
           "patches": {"se": str(paths["se"]), "osm": str(paths["osm"])},
           "scores": {"se": str(paths["scores_se"]), "osm": str(paths["scores_osm"])},
           "parameters": params or {}}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path.write_text(yaml.safe_dump(cfg))
    return path


def in_memory_merge(paths: dict, params: dict, patch_format: str = "full",
                    out_dtype=None) -> dict[str, torch.Tensor]:
    """The merge of docs/design.md §1.5–§1.7 on whole in-memory tensors (no engine code)."""
    base = load_dir(paths["base"])
    mode = params.get("mask_mode", "difference")
    gran = params.get("granularity", "global")
    p = params.get("retention", 1.0)
    patches, scores, th = {}, {}, {}
    for side in ("se", "osm"):
        if side not in paths:
            continue
        patches[side] = load_dir(paths[side])
        if mode != "none":
            scores[side] = load_dir(paths[f"scores_{side}"])
            sel = select_thresholds(scores[side], params.get(f"top_rate_{side}", 0.1), gran)
            th[side] = {g: s.threshold for g, s in sel.items()}
    out = {}
    for name, b in base.items():
        args, t = {}, {}
        for side in ("se", "osm"):
            if side not in patches or name not in patches[side]:
                continue
            if mode != "none" and name not in scores[side]:
                continue
            args[f"patch_{side}"] = patches[side][name].contiguous()
            if mode != "none":
                args[f"score_{side}"] = scores[side][name].contiguous()
                t[f"t_{side}"] = th[side][group_of(name, gran)]
        od = out_dtype or b.dtype
        if not args:
            out[name] = b.to(od)
            continue
        out[name] = masked_merge(
            b.contiguous(), args.get("patch_se"), args.get("patch_osm"), args.get("score_se"),
            args.get("score_osm"), t_se=t.get("t_se", math.inf), t_osm=t.get("t_osm", math.inf),
            mode=mode, alpha=params.get("alpha", 1.0), beta=params.get("beta", 1.0), p=p,
            rescale=params.get("rescale", False), seed=params.get("seed", 0), name=name,
            offset=0, patches_are_deltas=patch_format == "delta", out_dtype=od)
    return out


def dir_bytes(path: Path) -> dict[str, bytes]:
    """{relative file name: bytes} of every file under path."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def env_with_min_chunk(n: int) -> dict:
    env = dict(os.environ)
    env["SAFEPATCH_MERGE_MIN_CHUNK"] = str(n)
    return env


# SafePatching parameter sets of the merge-engine tests (label, parameters), also merged by
# bench/merge_bytes_parity.py.
ENGINE_CASES = [
    ("difference", {"top_rate_se": 0.2, "top_rate_osm": 0.3}),
    ("difference-retention", {"top_rate_se": 0.25, "top_rate_osm": 0.15, "retention": 0.6,
                              "rescale": True, "seed": 7, "alpha": 0.8, "beta": 1.5}),
    ("intersection-layer", {"mask_mode": "intersection", "top_rate_se": 0.4,
                            "top_rate_osm": 0.4, "granularity": "layer"}),
    ("topk-tensor", {"mask_mode": "topk", "top_rate_se": 0.07, "top_rate_osm": 0.5,
                     "granularity": "tensor", "retention": 0.9}),
    ("none", {"mask_mode": "none", "alpha": 0.5, "beta": 0.25}),
    ("se-only", {"top_rate_se": 0.3, "beta": 0.0}),
    ("zero-rates", {"top_rate_se": 0.0, "top_rate_osm": 0.0}),
]
