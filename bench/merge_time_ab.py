"""Wall time of one merge config, an older checkout (--base-src) vs this one, in alternating
runs on the same machine: `python -m safepatch_merge merge CONFIG OUT --max-memory M
--no-progress --overwrite`, each run in a fresh process, old first on even repetitions.
The older package is imported from a staging directory as merge_bytes_parity.py stages it.
Prints each run and the medians; --results appends a section to a markdown page.

    python bench/merge_time_ab.py --base-src /tmp/base CONFIG --repeats 3
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bytes_parity import git_head, stage_checkout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(cfg: Path, out: Path, budget: str, pythonpath: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env["PYTHONPATH"] = str(REPO)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "safepatch_merge", "merge", str(cfg), str(out),
                          "--max-memory", budget, "--no-progress", "--overwrite"], env=env,
                         cwd="/", capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"merge failed ({pythonpath or 'this checkout'}): {res.stderr[-2000:]}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--base-src", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--machine", default="2-core AMD EPYC VM, 24 GiB")
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="merge_ab_")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage_checkout(args.base_src.resolve(), stage)
    times = {"old": [], "new": []}
    for r in range(args.repeats):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            wall = run(args.config, work / f"out_{side}", args.max_memory,
                       str(stage) if side == "old" else None)
            times[side].append(wall)
            print(f"run {r} {side}: {wall:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"## {args.label or args.config.name}", "",
             f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}; "
             f"old: {git_head(args.base_src)}, new: {git_head(REPO)}",
             f"- machine: {args.machine} (other jobs share its 2 cores)",
             f"- command: `python bench/merge_time_ab.py {' '.join(argv or sys.argv[1:])}`", "",
             "| checkout | runs (s, in order) | median s |", "|---|---|---|"]
    for side in ("old", "new"):
        lines.append(f"| {side} | {', '.join(f'{t:.2f}' for t in times[side])} | "
                     f"{med[side]:.2f} |")
    lines += ["", f"new / old (medians): {med['new'] / med['old']:.3f}", ""]
    print("\n".join(lines))
    if args.results is not None:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
