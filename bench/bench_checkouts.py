"""CPU merge time of this checkout against an older one: bench/bench_merge.py's SafePatching
merge and bench/bench_classic.py's task arithmetic and TIES, both without mergekit, in
alternating order (round r runs the older checkout first when r is even), one run per
checkout and round; medians, ranges, and the ratio this / older of the medians.

    git worktree add --detach /tmp/base <commit>
    python bench/bench_checkouts.py --base-src /tmp/base --rounds 3 --workdir /tmp/bench_ab

Both checkouts run this checkout's bench scripts; the older package is imported from a
staging directory (see merge_bytes_parity.py) through PYTHONPATH. Inputs are generated once
(0.7 B synthetic bf16 models) and every variant first runs once untimed (extension build, page
cache). Writes --results (rewritten); every run's row is in --workdir/<variant>/*.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from merge_bytes_parity import git_head, reused_stage  # noqa: E402

VARIANTS = ("older", "this")
JOBS = ("safepatch", "task_arithmetic", "ties")  # bench_merge's merge, bench_classic's two


def env_for(variant: str, stage: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if variant == "older":
        env["PYTHONPATH"] = str(stage)
    return env


def run_variant(args, variant: str, stage: Path, first: bool = False) -> dict[str, float]:
    """One run of both bench scripts under `variant`: {job: wall seconds}."""
    out = args.workdir / variant
    env = env_for(variant, stage)
    py = sys.executable
    subprocess.run([py, str(REPO / "bench" / "bench_merge.py"), "--sizes", "0.7b", "--repeats",
                    "1", "--skip-mergekit", "--reuse-inputs", "--keep", "--workdir",
                    str(args.workdir / "merge"), "--results-dir", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([py, str(REPO / "bench" / "bench_classic.py"), "--repeats", "1",
                    "--skip-mergekit", "--keep", "--workdir", str(args.workdir / "classic"),
                    "--results-dir", str(out)] + ([] if first else ["--reuse", "--no-warm"]),
                   env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out / "merge.csv", newline="") as f:
        merge_rows = [r for r in csv.DictReader(f) if r["tool"] == "safepatch"]
    with open(out / "classic.csv", newline="") as f:
        classic_rows = list(csv.DictReader(f))
    got = {"safepatch": float(merge_rows[-1]["wall_s"])}
    for m in ("task_arithmetic", "ties"):
        got[m] = float([r for r in classic_rows if r["method"] == m][-1]["wall_s"])
    return got


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-src", required=True, type=Path, help="checkout of the older commit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_checkouts"))
    ap.add_argument("--machine", default=None, help="how to name the machine on the page")
    ap.add_argument("--results", type=Path,
                    default=REPO / "bench" / "results" / "checkouts_cpu.md")
    args = ap.parse_args(argv)
    base_src = args.base_src.resolve()
    stage = reused_stage(base_src, args.workdir)
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_merge.py"), "--sizes", "0.7b",
                    "--generate-only", "--reuse-inputs", "--workdir", str(args.workdir / "merge")],
                   check=True, stdout=subprocess.DEVNULL)
    for v in VARIANTS[::-1]:  # untimed: inputs, kernel builds, page cache
        run_variant(args, v, stage, first=(v == "this"))
    runs: dict[str, dict[str, list[float]]] = {v: {j: [] for j in JOBS} for v in VARIANTS}
    for r in range(args.rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            got = run_variant(args, v, stage)
            for j in JOBS:
                runs[v][j].append(got[j])
            print(f"round {r} {v}: {got}", flush=True)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"## {git_head(REPO)} against {git_head(base_src)} (cpu)", "",
             f"- date: {date}; this checkout: {git_head(REPO)}, older checkout: "
             f"{git_head(base_src)}",
             f"- machine: {args.machine or os.uname().nodename}",
             f"- command: `python bench/bench_checkouts.py {shlex.join(argv or sys.argv[1:])}`",
             "- jobs (0.7 B synthetic bf16 Llama, `--max-memory 1GiB`, wall time of the "
             "`python -m safepatch_merge merge` process): bench_merge.py's SafePatching merge "
             "(5 inputs, difference mode, top rates 0.1, retention 0.9); bench_classic.py's "
             "task arithmetic and TIES (density 0.1) from their mergekit YAML files",
             f"- {args.rounds} rounds, alternating which checkout runs first; one run per "
             "checkout and round; wall s = median (min-max)", "",
             "| job | older wall s | this wall s | this / older (medians) |",
             "|---|---|---|---|"]
    for j in JOBS:
        a, b = runs["older"][j], runs["this"][j]
        lines.append(f"| {j} | {spread(a)} | {spread(b)} | "
                     f"{statistics.median(b) / statistics.median(a):.3f} |")
    lines += ["", "Raw runs (seconds, in round order):", "", "```",
              json.dumps(runs, indent=1), "```", ""]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
