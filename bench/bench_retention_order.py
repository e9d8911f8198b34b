"""CPU merge time of the two retention orders against an older checkout: bench/bench_merge.py's
SafePatching merge (difference mode, top rates 0.1/0.1, retention 0.9), run in rotating order
(older checkout, after_selection, before_selection; each round starts one later), one run per
variant and round, medians and ranges.

    git worktree add /tmp/base <commit>
    python bench/bench_retention_order.py --base-src /tmp/base --repeats 5

The older checkout runs the same config (no retention_order key) from a staging directory
(see merge_bytes_parity.py); each variant first runs once untimed (its extension build, page
cache). Writes bench/results/retention_order_cpu.md (rewritten) and appends every run to
bench/results/retention_order.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from merge_bytes_parity import git_head, machine, reused_stage  # noqa: E402

VARIANTS = ("older checkout", "after_selection", "before_selection")


def bench_cmd(args, variant: str, results: Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "bench" / "bench_merge.py"), "--sizes", args.size,
           "--repeats", "1", "--skip-mergekit", "--reuse-inputs", "--keep", "--workdir",
           str(args.workdir), "--max-memory", args.max_memory, "--results-dir", str(results)]
    if variant == "before_selection":
        cmd += ["--retention-order", "before_selection"]
    return cmd


def env_for(variant: str, stage: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if variant == "older checkout":
        env["PYTHONPATH"] = str(stage)
    return env


def last_row(results: Path) -> dict:
    with open(results / "merge.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["tool"] == "safepatch"]
    return rows[-1]


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-src", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="0.7b")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_retention_order"))
    ap.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    base_src = args.base_src.resolve()
    stage = reused_stage(base_src, args.workdir)
    if not (args.workdir / args.size / "generated.ok").exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "bench_merge.py"), "--sizes",
                        args.size, "--generate-only", "--workdir", str(args.workdir)], check=True)
    runs = {v: [] for v in VARIANTS}
    log = args.workdir / "runs.log"
    for r in range(-1, args.repeats):  # round -1: untimed warm-up of every variant
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3] if r >= 0 else VARIANTS
        for v in order:
            res = args.workdir / f"results_{v.replace(' ', '_')}"
            with open(log, "a") as lf:
                subprocess.run(bench_cmd(args, v, res), env=env_for(v, stage), check=True,
                               stdout=lf, stderr=subprocess.STDOUT)
            row = last_row(res)
            st = json.loads(row["stages"])
            rec = {"variant": v, "round": r, "wall_s": float(row["wall_s"]),
                   "engine_s": float(row["engine_s"]), "prepass_s": st.get("prepass", 0.0),
                   "stream_s": st.get("stream", 0.0), "peak_rss_MiB": float(row["peak_rss_MiB"]),
                   "load": os.getloadavg()[0]}
            print(rec, flush=True)
            if r >= 0:
                runs[v].append(rec)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = git_head(REPO)
    csv_path = args.results_dir / "retention_order.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "head", "base", "machine", "size", "variant",
                                          "round", "wall_s", "engine_s", "prepass_s", "stream_s",
                                          "peak_rss_MiB", "load"])
        if new:
            w.writeheader()
        for v in VARIANTS:
            for rec in runs[v]:
                w.writerow({"date": date, "head": head, "base": git_head(base_src),
                            "machine": machine(), "size": args.size, **rec})
    lines = [f"# Retention order: CPU merge time ({args.size})", "",
             f"- date: {date}, head: {head}, older checkout: {git_head(base_src)}",
             f"- machine: {machine()} (shared with other work: 1-minute load average at each "
             "run in the csv)",
             f"- command: `python bench/bench_retention_order.py {' '.join(argv or sys.argv[1:])}`",
             f"- each run: `python bench/bench_merge.py --sizes {args.size} --repeats 1 "
             f"--skip-mergekit --reuse-inputs --max-memory {args.max_memory}` (SafePatching, "
             "difference mode, top rates 0.1/0.1, retention 0.9; before_selection adds "
             "`--retention-order before_selection`); rounds rotate the order of the variants",
             f"- seconds: median (min-max) of {args.repeats} runs; wall = the process, engine = "
             "merge() inside it; prepass = thresholds (before_selection: plus the retained-score "
             "histogram pass), stream = the merge pass", "",
             "| variant | wall s | engine s | prepass s | stream s | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        xs = runs[v]
        lines.append(f"| {v} | {spread([x['wall_s'] for x in xs])} | "
                     f"{spread([x['engine_s'] for x in xs])} | "
                     f"{spread([x['prepass_s'] for x in xs])} | "
                     f"{spread([x['stream_s'] for x in xs])} | "
                     f"{max(x['peak_rss_MiB'] for x in xs):.0f} |")
    lines += ["", "Every run (round, variant: wall s / engine s, load):", ""]
    for r in range(args.repeats):
        for v in VARIANTS:
            x = next(x for x in runs[v] if x["round"] == r)
            lines.append(f"- {r} {v}: {x['wall_s']:.2f} / {x['engine_s']:.2f} (load "
                         f"{x['load']:.1f})")
    (args.results_dir / f"retention_order_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
