"""Parity with mergekit itself: the same mergekit YAML merged by mergekit and by
`safepatch merge`, on tiny models, compared tensor by tensor.

Runs only where mergekit can be run: `mergekit` importable in this environment (it is then
run as ``python -m mergekit.scripts.run_yaml``), or SAFEPATCH_MERGEKIT_YAML naming a
`mergekit-yaml` executable (e.g. from a separate virtual env: mergekit pins its own torch).
Elsewhere, bench/results/classic_parity.md records the same comparison.

Expectations (docs/classic_merges.md): with float32 models and ``dtype: float32`` both
compute the same float32 operations in the same order, so outputs are identical except at
elements tied at TIES's trim threshold (mergekit's argsort keeps an arbitrary subset of a
tie, we keep all). With bfloat16 and ``dtype: bfloat16`` mergekit computes every step in
bfloat16 while we compute in float32 and round once, so outputs agree within bfloat16
rounding (adjacent bfloat16 values) except where TIES's trim or sign election sits on a
rounding boundary.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import yaml
from merge_helpers import load_dir

from safepatch_merge.merge import merge
from safepatch_merge.merge.config import load_config
from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir


def _mergekit_cmd():
    exe = os.environ.get("SAFEPATCH_MERGEKIT_YAML")
    if exe:
        return [exe]
    if importlib.util.find_spec("mergekit") is not None:
        return [sys.executable, "-m", "mergekit.scripts.run_yaml"]
    return None


MERGEKIT = _mergekit_cmd()
pytestmark = pytest.mark.skipif(
    MERGEKIT is None, reason="mergekit is not installed here and SAFEPATCH_MERGEKIT_YAML is not "
    "set (see bench/results/classic_parity.md for the recorded comparison)")


def run_mergekit(cfg_path, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(MERGEKIT + [str(cfg_path), str(out), "--quiet", "--no-write-model-card"],
                       capture_output=True, text=True, env=env, cwd=cfg_path.parent,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 values at |x| (float32)."""
    ax = x.float().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        m, tok = make_tiny_model(0, hidden_size=48, intermediate_size=96, dtype=dtype)
        save_model_dir(m, tok, root / tag / "base", max_shard_size="60KB")
        for i in range(2):
            save_model_dir(perturbed_copy(m, 0.02, seed=i + 1), tok, root / tag / f"ft{i}",
                           max_shard_size="60KB")
    return root


def _config(method, dtype):
    cfg = {"merge_method": method, "base_model": "./base",
           "models": [{"model": "./base"},
                      {"model": "./ft0", "parameters": {"weight": 0.7, "density": 0.3}},
                      {"model": "./ft1", "parameters": {"weight": 0.4, "density": 0.55}}],
           "dtype": dtype}
    if method == "task_arithmetic":
        for m in cfg["models"][1:]:
            m["parameters"].pop("density")
        cfg["parameters"] = {"lambda": 0.9}
    return cfg


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("tag,dtype", [("f32", "float32"), ("bf16", "bfloat16")])
def test_same_model_as_mergekit(tiny, tmp_path, monkeypatch, method, tag, dtype):
    root = tiny / tag
    cfg_path = root / f"{method}_{dtype}.yml"
    cfg_path.write_text(yaml.safe_dump(_config(method, dtype), sort_keys=False))
    mk_out, our_out = tmp_path / "mergekit", tmp_path / "ours"
    run_mergekit(cfg_path, mk_out)
    monkeypatch.chdir(root)
    merge(load_config(cfg_path), our_out)

    mk, ours = load_dir(mk_out), load_dir(our_out)
    base = load_dir(root / "base")
    fts = [load_dir(root / f"ft{i}") for i in range(2)]
    assert set(ours) == set(base)
    assert set(mk) <= set(ours)
    densities = (0.3, 0.55)
    n_excluded = n_total = 0
    for name in mk:
        a, b = ours[name], mk[name]
        assert a.dtype == b.dtype == getattr(torch, dtype), name
        excluded = torch.zeros(a.shape, dtype=torch.bool)
        if method == "ties":
            for f, dens in zip(fts, densities):  # at or, in bf16, rounding-close to the threshold
                d = f[name].float() - base[name].float()
                ad = d.to(b.dtype).float().abs()
                k = max(1, int(dens * ad.numel()))
                t = torch.sort(ad.reshape(-1), descending=True).values[k - 1]
                excluded |= ad == t
            if tag == "bf16":  # the elected sign of a bf16 sum within rounding of 0 can flip
                wd = [w * (f[name].float() - base[name].float()) for f, w in zip(fts, (0.7, 0.4))]
                excluded |= sum(wd).abs() <= 4 * bf16_ulp(sum(x.abs() for x in wd))
        n_excluded += int(excluded.sum())
        n_total += excluded.numel()
        keep = ~excluded
        if tag == "f32":
            assert torch.equal(a[keep], b[keep]), name
        else:
            # mergekit rounds every step (delta, weighted delta, sums, λ, base + mixed) to
            # bf16: each error is half a bf16 ulp of that step's result, so the bound is a
            # few ulps of the largest magnitude involved, |base| or Σ|w·d|.
            scale = torch.maximum(base[name].float().abs(), sum(
                w * (f[name].float() - base[name].float()).abs() for f, w in zip(fts, (0.7, 0.4))))
            diff = (a.float() - b.float()).abs()[keep]
            ulps = diff / bf16_ulp(scale)[keep]
            assert float(ulps.max()) <= 4, f"{name}: {float(ulps.max())} bf16 ulps"
    assert n_excluded < 0.05 * n_total  # (norm weights of a bf16 model tie a lot)
