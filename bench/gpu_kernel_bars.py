"""Kernel-level bandwidth bars on a CUDA device (run by bench/gpu_check.sh).

Times each op on every backend that serves CUDA tensors (triton, cpp = the CUDA C++ extension,
reference = plain torch) with CUDA events (median of repeats, after warm-up), converts to
achieved GB/s (bytes read + written / time) and compares with the device-to-device copy
bandwidth measured in the same run. Bars: masked_merge >= 80 % of copy,
radix_histogram >= 50 %, saliency_accumulate_ >= 80 %, each >= 5x the reference.

    python3 bench/gpu_kernel_bars.py [--n 67108864] [--csv bench/results/kernel_bars.csv]
                                     [--sweep full|small|none]

Bytes per element: merge 16 (bf16 base, two bf16 full patched tensors, two fp32 score
tensors, bf16 out); histogram 4 (fp32 scores); saliency 12 (fp32 score read + written,
bf16 weight and grad).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys

import torch

from safepatch_merge import ops
from safepatch_merge.ops import reference

BARS = {"masked_merge": 0.80, "radix_histogram": 0.50, "saliency_accumulate_": 0.80}


def timed(fn, reps: int, warmup: int = 3, inner: int = 5) -> float:
    """Median milliseconds per fn() call over `reps` runs of `inner` back-to-back calls, CUDA
    events around each run. Back-to-back calls keep the GPU's queue full, so the host work of
    one call (argument checks, allocation, launch: ~0.1-0.2 ms through the public ops) overlaps
    the previous kernel instead of being counted as idle GPU time, as it was with one call
    between a synchronize and the end event (run 1: the default merge launch timed 0.47 ms
    through ops.masked_merge, the same launch 0.30 ms in the direct-call sweep)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def copy_gbps(n_bytes: int) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps=20)  # same back-to-back timing as the kernels
    return 2 * n_bytes / ms / 1e6


def backends() -> list[str]:
    out = []
    for name in ("triton", "cpp", "reference"):
        try:
            ops.set_backend(name)
            ops.backend_for("cuda")
            out.append(name)
        except RuntimeError as e:
            print(f"# backend {name} unavailable on cuda: {e}", file=sys.stderr)
    ops.set_backend(None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 26, help="elements per tensor (default 2^26)")
    ap.add_argument("--csv", default="bench/results/kernel_bars.csv")
    ap.add_argument("--skip-reference", action="store_true",
                    help="do not time the plain-torch reference (bench_ops.py does); no 5x check")
    ap.add_argument("--sweep", choices=("full", "small", "none"), default="full",
                    help="Triton launch-parameter sweep: full, small (the defaults plus one or two "
                         "alternatives each: a short run) or none")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    n = args.n
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    copy = copy_gbps(16 * n)  # a copy as large as the merge's traffic
    name = torch.cuda.get_device_name()
    print(f"device: {name}; copy bandwidth {copy:.0f} GB/s (read + write)")

    base = torch.randn(n, device=dev, generator=g).to(torch.bfloat16)
    p_se = (base.float() + 0.01 * torch.randn(n, device=dev, generator=g)).to(torch.bfloat16)
    p_osm = (base.float() + 0.01 * torch.randn(n, device=dev, generator=g)).to(torch.bfloat16)
    # SNIP-like scores: log-normal over many decades.
    s_se = torch.exp(3 * torch.randn(n, device=dev, generator=g) - 12)
    s_osm = torch.exp(3 * torch.randn(n, device=dev, generator=g) - 12)
    uni = torch.rand(n, device=dev, generator=g)
    t_se = float(s_se[: 1 << 24].quantile(0.9))  # top ~10 % (quantile takes <= 2^24 elements)
    t_osm = float(s_osm[: 1 << 24].quantile(0.9))
    score = torch.zeros(n, device=dev)
    weight, gr = base, p_se
    merge_kw = dict(t_se=t_se, t_osm=t_osm, mode="difference", alpha=1.0, beta=0.5, p=0.5, rescale=True,
                    seed=1, name="model.layers.0.mlp.up_proj.weight", offset=0, patches_are_deltas=False,
                    out_dtype=torch.bfloat16)
    prefix = int(reference.score_keys(s_se[:1]).item()) >> 16
    cases = {
        "masked_merge": (16, lambda: ops.masked_merge(base, p_se, p_osm, s_se, s_osm, **merge_kw)),
        "radix_histogram": (4, lambda: ops.radix_histogram(s_se, 0, 0)),
        "radix_histogram[uniform]": (4, lambda: ops.radix_histogram(uni, 0, 0)),
        "radix_histogram[digit1]": (4, lambda: ops.radix_histogram(s_se, prefix, 1)),
        "saliency_accumulate_": (12, lambda: ops.saliency_accumulate_(score, weight, gr, 0.5)),
    }
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for op, (bpe, fn) in cases.items():
        ref_ms = None
        results = {}
        for be in backends():
            if be == "reference" and args.skip_reference:
                continue
            ops.set_backend(be)
            try:
                ms = timed(fn, reps=3 if be == "reference" else 20, warmup=1 if be == "reference" else 3,
                           inner=1 if be == "reference" else 5)
            except Exception as e:  # noqa: BLE001 - report and go on with the other backends
                print(f"{op} {be}: FAILED {type(e).__name__}: {e}")
                continue
            results[be] = ms
        ops.set_backend(None)
        ref_ms = results.get("reference")
        for be, ms in results.items():
            gbps = bpe * n / ms / 1e6
            frac = gbps / copy
            speed = ref_ms / ms if ref_ms else float("nan")
            bar = BARS.get(op.split("[")[0])
            verdict = ""
            if bar is not None and be != "reference":
                verdict = "PASS" if frac >= bar and (speed >= 5 or not ref_ms) else "FAIL"
            rows.append(dict(op=op, backend=be, n=n, ms=round(ms, 4), gbps=round(gbps, 1),
                             copy_gbps=round(copy, 1), frac_of_copy=round(frac, 3),
                             speedup_vs_reference=round(speed, 1), bar=bar or "", verdict=verdict,
                             device=name, commit=commit, timestamp=stamp))
            print(f"{op:28s} {be:10s} {ms:9.3f} ms {gbps:8.0f} GB/s {100 * frac:6.1f}% of copy "
                  f"{speed:7.1f}x ref  {verdict}")
    # Launch-parameter sweep of the Triton kernels (tuning data for their defaults).
    from safepatch_merge.triton_kernels import histogram as tk_hist
    from safepatch_merge.triton_kernels import masked_merge as tk_merge
    from safepatch_merge.triton_kernels import saliency as tk_sal

    m_args = (base, p_se, p_osm, s_se, s_osm, reference.threshold_key(t_se), reference.threshold_key(t_osm),
              0, 2.0, 1.0, 1 << 31, 1, 12345, 0, False, torch.bfloat16, False)
    # (first entry of each list: the kernel's default launch)
    small = args.sweep == "small"
    hist_cfgs = ((16, 4096, 8), (64, 4096, 8)) if small else \
        ((1, 4096, 8), (16, 4096, 8), (64, 4096, 8), (16, 8192, 16))
    merge_cfgs = ((256, 4), (512, 4), (128, 4)) if small else \
        ((256, 4), (512, 4), (128, 4), (1024, 8), (2048, 8), (256, 8))
    sal_cfgs = ((4096, 8), (2048, 4)) if small else ((2048, 4), (4096, 8), (8192, 16))
    sweep = [("radix_histogram", 4, f"copies={c},block={b},warps={w}",
              lambda c=c, b=b, w=w: tk_hist.radix_histogram(s_se, 0, 0, block=b, num_warps=w, copies=c))
             for c, b, w in hist_cfgs]
    sweep += [("masked_merge", 16, f"rows={r},warps={w}",
               lambda r=r, w=w: tk_merge.masked_merge(*m_args, rows=r, num_warps=w))
              for r, w in merge_cfgs]
    sweep += [("saliency_accumulate_", 12, f"block={b},warps={w}",
               lambda b=b, w=w: tk_sal.saliency_accumulate_(score, weight, gr, 0.5, block=b, num_warps=w))
              for b, w in sal_cfgs]
    if args.sweep == "none":
        sweep = []
    for op, bpe, cfg, fn in sweep:
        try:
            ms = timed(fn, reps=10)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is data too
            print(f"sweep {op} {cfg}: {type(e).__name__}: {e}")
            continue
        gbps = bpe * n / ms / 1e6
        rows.append(dict(op=op, backend=f"triton[{cfg}]", n=n, ms=round(ms, 4), gbps=round(gbps, 1),
                         copy_gbps=round(copy, 1), frac_of_copy=round(gbps / copy, 3), speedup_vs_reference="",
                         bar="", verdict="", device=name, commit=commit, timestamp=stamp))
        print(f"sweep {op:22s} {cfg:30s} {ms:9.3f} ms {gbps:8.0f} GB/s {100 * gbps / copy:6.1f}% of copy")
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
