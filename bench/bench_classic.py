"""Classic merges vs mergekit, side by side in one run (issue 5's performance bar).

Same synthetic Llama-shaped bf16 model as bench/bench_merge.py (its generator: TinyLlama
widths, 13 layers = 0.70 B parameters) plus two fine-tunes (base + N(0, 0.002²)), and two
mergekit YAML files used as they are by both tools:
  * task_arithmetic, weights 1.0 / 1.0, dtype bfloat16
  * ties, density 0.1, weights 1.0 / 1.0, dtype bfloat16
For each method the runs alternate (mergekit first on even repetitions), `--repeats` times:
mergekit 0.1.5 (`mergekit-yaml --no-copy-tokenizer`, its own venv, CPU torch) and
`safepatch merge FILE OUT --max-memory 1GiB`; wall time and peak RSS (/usr/bin/time) of each
process, medians over repetitions. Then the two outputs of each method are compared element
by element (mergekit computes in bf16 and ranks TIES's |delta| after bf16 rounding; we compute
in fp32 and round once, so small differences are expected and reported).

Before timing, one untimed `safepatch merge` on a 2-layer model of the same widths fills
torch.compile's on-disk cache (a one-time cost per machine, like building the C++ ops).

    python bench/bench_classic.py --repeats 3 --workdir /work/bench_classic_tmp

Results: bench/results/classic.csv (appended) and bench/results/classic_cpu.md (rewritten).
"""
from __future__ import annotations

import argparse
import datetime as dt
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import (SIZES, _gen, compare, llama_config, machine, tensor_specs,  # noqa: E402
                         timed, write_checkpoint)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METHODS = {"task_arithmetic": {}, "ties": {"density": 0.1}}


def generate(root: Path, layers: int) -> dict[str, Path]:
    """base/, ft0/, ft1/ bf16 checkpoints with bench_merge's generator."""
    specs, cfg = tensor_specs(layers), llama_config(layers)
    paths = {k: root / k for k in ("base", "ft0", "ft1")}
    t0 = time.time()
    write_checkpoint(paths["base"], specs, lambda n, s: _gen(n, s, 0), torch.bfloat16, cfg)
    for i in range(2):
        def patched(n, s, i=i):
            b = _gen(n, s, 0).to(torch.bfloat16).float()
            g = torch.Generator().manual_seed(50 + i + len(n))
            return b + 0.002 * torch.randn(s, generator=g)
        write_checkpoint(paths[f"ft{i}"], specs, patched, torch.bfloat16, cfg)
    print(f"generated {layers}-layer inputs in {time.time() - t0:.0f} s", flush=True)
    return paths


def mergekit_yaml(paths, method: str) -> dict:
    models = [{"model": str(paths["base"])}]
    for k in ("ft0", "ft1"):
        models.append({"model": str(paths[k]), "parameters": {"weight": 1.0, **METHODS[method]}})
    return {"merge_method": method, "base_model": str(paths["base"]), "models": models,
            "dtype": "bfloat16"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="0.7b", choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-ties", type=int, default=None,
                    help="repetitions for ties (default --repeats; mergekit's ties is slow)")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--workdir", default="/work/bench_classic_tmp")
    ap.add_argument("--mergekit-venv", default="/work/mk-venv")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    mk = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    methods = args.methods.split(",")
    shutil.rmtree(work, ignore_errors=True)
    layers = SIZES[args.size]
    n_params = sum(int(torch.tensor(s).prod()) for _, s in tensor_specs(layers))

    def sp_cmd(cfg, out):
        return [sys.executable, "-m", "safepatch_merge", "merge", str(cfg), str(out),
                "--max-memory", args.max_memory, "--no-progress", "--overwrite"]

    # Fill torch.compile's cache with the same kernels on a 2-layer model (untimed).
    warm = generate(work / "warm", SIZES["tiny"])
    for m in methods:
        (work / "warm" / f"{m}.yaml").write_text(yaml.safe_dump(mergekit_yaml(warm, m)))
        t0 = time.perf_counter()
        timed(sp_cmd(work / "warm" / f"{m}.yaml", work / "warm" / f"out_{m}"), env,
              work / "warm.log")
        print(f"warm-up {m}: {time.perf_counter() - t0:.0f} s", flush=True)
    shutil.rmtree(work / "warm")

    root = work / args.size
    paths = generate(root, layers)
    rows, med, cmp = [], {}, {}
    csv_path = RESULTS / "classic.csv"
    fields = ["date", "commit", "machine", "size", "params", "method", "tool", "run", "wall_s",
              "peak_rss_MiB"]
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            w.writeheader()
        for method in methods:
            cfg = root / f"{method}.yaml"
            cfg.write_text(yaml.safe_dump(mergekit_yaml(paths, method), sort_keys=False))
            cmds = {"mergekit": [str(mk), str(cfg), str(root / f"mk_{method}"),
                                 "--no-copy-tokenizer"],
                    "safepatch": sp_cmd(cfg, root / f"sp_{method}")}
            res = {"mergekit": [], "safepatch": []}
            reps = args.repeats_ties if method == "ties" and args.repeats_ties else args.repeats
            for r in range(reps):
                order = ["mergekit", "safepatch"] if r % 2 == 0 else ["safepatch", "mergekit"]
                for tool in order:
                    shutil.rmtree(root / f"{'mk' if tool == 'mergekit' else 'sp'}_{method}",
                                  ignore_errors=True)
                    wall, rss = timed(cmds[tool], env, root / f"{tool}_{method}.log")
                    res[tool].append((wall, rss))
                    row = {"date": date, "commit": commit, "machine": machine(),
                           "size": args.size, "params": n_params, "method": method,
                           "tool": tool, "run": r, "wall_s": round(wall, 2),
                           "peak_rss_MiB": round(rss / 2**20, 1)}
                    w.writerow(row)
                    f.flush()
                    rows.append(row)
                    print(row, flush=True)
            med[method] = {t: (statistics.median(x for x, _ in v), max(y for _, y in v))
                           for t, v in res.items()}
            cmp[method] = compare(root / f"sp_{method}", root / f"mk_{method}")
            print(method, med[method], cmp[method], flush=True)

    bars = {"task_arithmetic": 0.5, "ties": 0.1}
    lines = ["# Classic merges vs mergekit (cpu)", "",
             f"- date: {date}, commit: {commit}", f"- machine: {machine()} (shared: other "
             "jobs ran on the same 2 cores, so absolute times are noisy; compare ratios)",
             f"- command: `python bench/bench_classic.py --repeats {args.repeats} "
             f"--repeats-ties {args.repeats_ties or args.repeats} --size {args.size}`",
             f"- model: synthetic Llama ({layers} layers, hidden 2048, {n_params / 1e9:.2f} B "
             "params, bf16) + 2 fine-tunes (base + N(0, 0.002²)); same mergekit YAML for both "
             "tools: weights 1.0/1.0, dtype bfloat16; ties density 0.1",
             "- mergekit 0.1.5: `mergekit-yaml FILE OUT --no-copy-tokenizer` (own venv, CPU "
             "torch 2.13); safepatch: `python -m safepatch_merge merge FILE OUT --max-memory "
             f"{args.max_memory}` (torch.compile cache warmed by one untimed run on a 2-layer "
             "model)",
             f"- {args.repeats} alternating repetitions per method (ties: "
             f"{args.repeats_ties or args.repeats}); wall = median; peak RSS = "
             "max over runs (/usr/bin/time %M)", "",
             "| method | tool | wall s (median) | peak RSS MiB | wall ratio safepatch/mergekit "
             "| bar |", "|---|---|---|---|---|---|"]
    for method in methods:
        ratio = med[method]["safepatch"][0] / med[method]["mergekit"][0]
        for tool in ("mergekit", "safepatch"):
            wall, rss = med[method][tool]
            lines.append(f"| {method} | {tool} | {wall:.1f} | {rss / 2**20:.0f} | "
                         f"{ratio:.3f} | <= {bars.get(method, '-')} |" if tool == "safepatch"
                         else f"| {method} | {tool} | {wall:.1f} | {rss / 2**20:.0f} | | |")
    lines += ["", "Numerical comparison of the two outputs (bf16 elements; 'steps' = "
              "|difference| in bf16 spacings at the larger magnitude):", ""]
    for method in methods:
        c = cmp[method]
        lines.append(f"- {method}: {c['differ']} of {c['elements']} elements differ "
                     f"({c['differ'] / c['elements']:.3%}), max |diff| {c['max_abs']:.3g}, "
                     f"max {c['max_steps']:.3g} steps")
    lines += ["", "Differences: mergekit computes every step in bf16 (delta, weighted delta, "
              "sums, division) and ranks TIES's |delta| after rounding it to bf16; safepatch "
              "computes in fp32 and rounds once. Elements near TIES's trim threshold or with an "
              "elected-sign sum near 0 can therefore land on the other side (see "
              "classic_parity.md for the tie-aware comparison on tiny models: identical in "
              "fp32)."]
    (RESULTS / "classic_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
