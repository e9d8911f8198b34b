"""Recorded parity of the classic merges with mergekit on tiny models (the comparison that
tests/test_mergekit_parity.py asserts where mergekit is installed).

    python bench/classic_parity.py --mergekit /work/mk-venv/bin/mergekit-yaml

For task_arithmetic and ties, float32 and bfloat16 tiny Llama models (2 fine-tunes), one
mergekit YAML each, merged by `mergekit-yaml` and by safepatch's engine; per method/dtype:
elements compared, identical, within one bfloat16/float32 ulp of the output, the worst
difference in ulps of max(|base|, Σ|w·d|) (the largest magnitude mergekit rounds), and
elements excluded as tied at (or, in bf16, rounding-equal to) TIES's trim threshold or,
in bf16, with an elected-sign sum within 4 bf16 ulps of zero (mergekit sums in bf16).
Writes bench/results/classic_parity.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS, DENSITIES = (0.7, 0.4), (0.3, 0.55)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    idx = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mant = 7 if dtype == torch.bfloat16 else 23
    ax = x.float().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(ax)) - mant)


def config(method: str, dtype: str) -> dict:
    models = [{"model": "./base"}]
    for i, (w, d) in enumerate(zip(WEIGHTS, DENSITIES)):
        p = {"weight": w} if method == "task_arithmetic" else {"weight": w, "density": d}
        models.append({"model": f"./ft{i}", "parameters": p})
    cfg = {"merge_method": method, "base_model": "./base", "models": models, "dtype": dtype}
    if method == "task_arithmetic":
        cfg["parameters"] = {"lambda": 0.9}
    return cfg


def compare(method, torch_dtype, base, fts, mk, ours) -> dict:
    n = same = one_ulp = excluded = 0
    worst = 0.0
    for name, b in mk.items():
        a = ours[name]
        ex = torch.zeros(a.shape, dtype=torch.bool)
        if method == "ties":
            for f, dens in zip(fts, DENSITIES):
                ad = (f[name].float() - base[name].float()).to(torch_dtype).float().abs()
                k = max(1, int(dens * ad.numel()))
                t = torch.sort(ad.reshape(-1), descending=True).values[k - 1]
                ex |= ad == t
            if torch_dtype == torch.bfloat16:  # elected sign within bf16 rounding of 0
                wd = [w * (f[name].float() - base[name].float()) for f, w in zip(fts, WEIGHTS)]
                ex |= sum(wd).abs() <= 4 * ulp(sum(x.abs() for x in wd), torch_dtype)
        keep = ~ex
        scale = torch.maximum(base[name].float().abs(), sum(
            w * (f[name].float() - base[name].float()).abs() for f, w in zip(fts, WEIGHTS)))
        diff = (a.float() - b.float()).abs()[keep]
        n += int(keep.sum())
        excluded += int(ex.sum())
        same += int((diff == 0).sum())
        one_ulp += int((diff <= ulp(b.float(), torch_dtype)[keep]).sum())
        if diff.numel():
            worst = max(worst, float((diff / ulp(scale, torch_dtype)[keep]).max()))
    return {"elements": n, "identical": same, "within_1ulp_of_output": one_ulp,
            "max_ulps_of_largest_operand": worst, "excluded_at_trim_threshold": excluded}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default=os.environ.get("SAFEPATCH_MERGEKIT_YAML"),
                    help="mergekit-yaml executable (default $SAFEPATCH_MERGEKIT_YAML)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "classic_parity"))
    args = ap.parse_args()
    if not args.mergekit:
        ap.error("give --mergekit PATH/TO/mergekit-yaml")
    from safepatch_merge.merge import merge
    from safepatch_merge.merge.config import load_config
    from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir

    mk_version = subprocess.run([str(Path(args.mergekit).parent / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() or "?"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for torch_dtype, dname in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
            root = Path(tmp) / dname
            m, tok = make_tiny_model(0, hidden_size=48, intermediate_size=96, dtype=torch_dtype)
            save_model_dir(m, tok, root / "base", max_shard_size="60KB")
            for i in range(2):
                save_model_dir(perturbed_copy(m, 0.02, seed=i + 1), tok, root / f"ft{i}",
                               max_shard_size="60KB")
            base = load_dir(root / "base")
            fts = [load_dir(root / f"ft{i}") for i in range(2)]
            for method in ("task_arithmetic", "ties"):
                cfg = root / f"{method}.yml"
                cfg.write_text(yaml.safe_dump(config(method, dname), sort_keys=False))
                env = dict(os.environ, HF_HUB_OFFLINE="1")
                subprocess.run([args.mergekit, str(cfg), str(root / f"mk_{method}"), "--quiet",
                                "--no-write-model-card"], check=True, cwd=root, env=env,
                               capture_output=True)
                cwd = os.getcwd()
                os.chdir(root)
                try:
                    merge(load_config(cfg), root / f"ours_{method}")
                finally:
                    os.chdir(cwd)
                r = compare(method, torch_dtype, base, fts, load_dir(root / f"mk_{method}"),
                            load_dir(root / f"ours_{method}"))
                rows.append({"method": method, "dtype": dname, **r})
                print(rows[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {"commit": commit, "timestamp": stamp, "mergekit": mk_version,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out = Path(args.out)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    lines = [f"# Classic merges vs mergekit {mk_version} on tiny models", "",
             f"commit {commit}, {stamp}, torch {torch.__version__}; command: "
             "`python bench/classic_parity.py --mergekit /work/mk-venv/bin/mergekit-yaml`", "",
             "Tiny Llama (hidden 48, 2 layers, vocab 259), two fine-tunes (base + N(0, 0.02²)), "
             f"weights {WEIGHTS}, densities {DENSITIES} (ties), lambda 0.9 (task_arithmetic); "
             "config `dtype` = the models' dtype. 'ulps of largest operand': the worst "
             "|ours − mergekit| in ulps of max(|base|, Σ|w·d|) — mergekit rounds each step to "
             "`dtype`, we compute in float32 and round once.", "",
             "| method | dtype | elements | identical | within 1 ulp of output | worst (ulps of "
             "largest operand) | excluded (ties at trim threshold; bf16: sign sum ≈ 0) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['dtype']} | {r['elements']} | {r['identical']} "
                     f"({r['identical'] / r['elements']:.2%}) | {r['within_1ulp_of_output']} "
                     f"({r['within_1ulp_of_output'] / r['elements']:.2%}) | "
                     f"{r['max_ulps_of_largest_operand']:.2f} | "
                     f"{r['excluded_at_trim_threshold']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
