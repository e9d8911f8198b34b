"""Time every op on every backend that serves a device; GB/s beside the copy bandwidth.

    python bench/bench_ops.py                      # CPU, all threads, 64M elements
    python bench/bench_ops.py --device cuda        # triton, cpp (CUDA) and reference on a GPU
    python bench/bench_ops.py --numel 16777216 --reps 5 --ops masked_merge
    python bench/bench_ops.py --cpu-time           # 1 thread, CPU time: robust to other load

Each op runs through the public ``safepatch_merge.ops`` function with one backend forced
(``ops.set_backend``), after warm-up; the median of ``--reps`` runs is reported as achieved
GB/s = bytes read + written / time, beside the copy bandwidth measured in the same run
(``dst.copy_(src)`` of a large uint8 tensor, 2 bytes moved per byte) and the plain-torch
reference. The reference is far slower and needs many temporaries, so on a CPU it runs on the
first ``--ref-numel`` elements (default 1M) and speedups compare throughputs (GB/s).
Every repeat times the copy right before the op; "of copy" is the median of the per-repeat
ratios (steadier than a ratio of medians on a shared machine).

Cases (bytes per element):
  masked_merge          16  bf16 base, two bf16 *full* patched tensors, two fp32 score tensors,
                            bf16 out; mode difference, top 20 % per patch, p = 0.5 (DARE rescale)
  radix_histogram d0     4  fp32 scores, digit 0 (all elements)
  radix_histogram d1     4  fp32 scores, digit 1 under the fullest digit-0 bin
  saliency_accumulate_  12  fp32 score read + written, bf16 weight and grad
Rows are appended to bench/results/ops.csv; a table is printed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from safepatch_merge import ops

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["date_utc", "commit", "device", "device_name", "threads", "op", "backend", "dtype",
          "numel", "bytes_per_elem", "median_s", "reps", "gbps", "copy_gbps", "frac_of_copy",
          "speedup_vs_reference", "note"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_clock = time.perf_counter


def seconds(fn, device: torch.device) -> float:
    sync(device)
    t0 = _clock()
    fn()
    sync(device)
    return _clock() - t0


def paired_medians(fn, nbytes: int, device: torch.device, copy_bytes: int, reps: int,
                   warmup: int) -> tuple[float, float, float]:
    """(median op seconds, median copy GB/s, median of per-repeat op/copy bandwidth ratios).

    Each repeat times a large copy right before the op, so a ratio compares two numbers taken
    under the same load: on a shared machine the ratios are far steadier than either number.
    """
    src = torch.ones(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        fn()
        dst.copy_(src)
    ts, cbws, ratios = [], [], []
    for _ in range(reps):
        tc = seconds(lambda: dst.copy_(src), device)
        t = seconds(fn, device)
        cbw = 2 * copy_bytes / tc / 1e9
        ts.append(t)
        cbws.append(cbw)
        ratios.append(nbytes / t / 1e9 / cbw)
    return statistics.median(ts), statistics.median(cbws), statistics.median(ratios)


def backends_for(device: torch.device, wanted: list[str] | None) -> list[str]:
    names = []
    for name in ("reference", "cpp", "triton"):
        if wanted and name not in wanted:
            continue
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is a correctness tool, not a speed target
        if ops._backend_module(name, device) is not None:
            names.append(name)
    return names


def make_cases(device: torch.device, n: int):
    """{op: (bytes per element, dtype label, fn(numel) -> callable)}, inputs built once."""
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(n, generator=g, device=device).to(torch.bfloat16)
    full_se = (base.float() + 0.01 * torch.randn(n, generator=g, device=device)).to(torch.bfloat16)
    full_osm = (base.float() + 0.01 * torch.randn(n, generator=g, device=device)).to(torch.bfloat16)
    s_se = torch.rand(n, generator=g, device=device)
    s_osm = torch.rand(n, generator=g, device=device)
    score = torch.zeros(n, device=device)
    weight = torch.randn(n, generator=g, device=device).to(torch.bfloat16)
    grad = torch.randn(n, generator=g, device=device).to(torch.bfloat16)
    prefix = int(torch.argmax(ops.reference.radix_histogram(s_se[: 1 << 20].cpu(), 0, 0)))

    def merge(m):
        return lambda: ops.masked_merge(base[:m], full_se[:m], full_osm[:m], s_se[:m], s_osm[:m],
                                        t_se=0.8, t_osm=0.8, mode="difference", p=0.5,
                                        rescale=True, seed=1, name="bench.weight",
                                        patches_are_deltas=False, out_dtype=torch.bfloat16)

    return {
        "masked_merge": (16, "bf16/full/fp32-scores", merge),
        "radix_histogram_d0": (4, "fp32", lambda m: lambda: ops.radix_histogram(s_se[:m], 0, 0)),
        "radix_histogram_d1": (4, "fp32", lambda m: lambda: ops.radix_histogram(s_se[:m], prefix, 1)),
        "saliency_accumulate_": (12, "fp32+=bf16*bf16", lambda m: lambda: ops.saliency_accumulate_(
            score[:m], weight[:m], grad[:m], 0.5)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--numel", type=int, default=64 * 2**20)
    ap.add_argument("--ref-numel", type=int, default=None,
                    help="elements for the reference backend (default: 1M on CPU, --numel on CUDA)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ops", nargs="*", default=None, help="subset of ops (default: all)")
    ap.add_argument("--backends", nargs="*", default=None, help="subset of backends")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--csv", default=str(REPO / "bench" / "results" / "ops.csv"))
    ap.add_argument("--note", default="", help="free text stored with every row")
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU only: one thread, timed by the thread's CPU time instead of the wall "
                         "clock (what each op costs, robust to other load on a shared machine)")
    a = ap.parse_args(argv)
    global _clock
    if a.cpu_time:
        if a.device != "cpu":
            ap.error("--cpu-time needs --device cpu")
        _clock = time.thread_time
        a.threads = 1
        a.note = ("clock=thread-cpu-time; " + a.note).strip("; ")

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    ref_n = a.ref_numel or (min(a.numel, 2**20) if device.type == "cpu" else a.numel)
    # the copy that measures bandwidth must dwarf every cache: 256 MiB .. 1 GiB
    copy_bytes = min(1 << 30, max(1 << 28, a.numel * 8))
    backends = backends_for(device, a.backends)
    cases = make_cases(device, a.numel)
    if a.ops:
        cases = {k: v for k, v in cases.items() if k in a.ops}
    name, rev = device_name(device), commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"# {name}, threads={threads or '-'}, commit {rev}, backends {backends}, numel {a.numel}")

    rows = []
    try:
        for op, (bpe, dtype, make) in cases.items():
            ref_gbps = None
            res = {}
            for be in backends:
                ops.set_backend(be)
                m = ref_n if be == "reference" else a.numel
                reps = max(3, a.reps // 2) if be == "reference" else a.reps
                warm = min(1, a.warmup) if be == "reference" else a.warmup
                try:
                    t, cbw, frac = paired_medians(make(m), bpe * m, device, copy_bytes, reps, warm)
                except Exception as e:  # noqa: BLE001 - report it, time the other backends
                    print(f"{op} {be}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                gbps = bpe * m / t / 1e9
                res[be] = (m, t, reps, gbps, cbw, frac)
                if be == "reference":
                    ref_gbps = gbps
            for be, (m, t, reps, gbps, cbw, frac) in res.items():
                rows.append(dict(date_utc=date, commit=rev, device=device.type, device_name=name,
                                 threads=threads, op=op, backend=be, dtype=dtype, numel=m,
                                 bytes_per_elem=bpe, median_s=f"{t:.6g}", reps=reps,
                                 gbps=f"{gbps:.3f}", copy_gbps=f"{cbw:.3f}",
                                 frac_of_copy=f"{frac:.3f}",
                                 speedup_vs_reference=f"{gbps / ref_gbps:.1f}" if ref_gbps else "",
                                 note=a.note))
    finally:
        ops.set_backend(None)

    out = Path(a.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)

    hdr = f"{'op':22} {'backend':9} {'numel':>10} {'median ms':>10} {'GB/s':>8} {'copy GB/s':>9} " \
          f"{'of copy':>7} {'vs ref':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['op']:22} {r['backend']:9} {r['numel']:>10} {float(r['median_s']) * 1e3:>10.2f} "
              f"{float(r['gbps']):>8.2f} {float(r['copy_gbps']):>9.2f} "
              f"{float(r['frac_of_copy']) * 100:>6.0f}% {r['speedup_vs_reference'] or '-':>7}")
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
