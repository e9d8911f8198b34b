"""Cost of SNIP scoring vs a plain forward+backward, and its peak memory vs keeping all grads.

Three ways over the same batches of prompt/response pairs (SmolLM2-135M-Instruct by default;
--data FILE, default the packaged benign reference answers; the cost depends on the
examples' lengths, not on what they say):
  fwdbwd         plain forward+backward with the loss Σ_b (n_b/N)·L_b (gradients accumulate in
                 .grad, as training with accumulation does) — the time baseline;
  snip           safepatch_merge.score.snip.snip_scores: post-accumulate-grad hooks, fused
                 saliency_accumulate_, each gradient freed in its hook, |·| at the end;
  allgrads_per_batch  the same arithmetic without hooks: each backward keeps all gradients,
                 then the fused op adds (n_b/N)·θ⊙g into the fp32 buffers — memory baseline 1;
  allgrads_sum   plain autograd keeping every gradient, accumulated in .grad over the batches
                 (Σ_b (n_b/N)·g_b), then fp32 |θ ⊙ g| buffers at the end — memory baseline 2
                 (equal scores because θ is fixed; needs fp32 gradients to keep precision);
  snip_host      (--host-buffers) snip with the score buffers in host memory
                 (score/host_buffers.py): timed and measured beside the others.
Timing: fwdbwd and snip interleaved in one process, median of --repeats after a warm-up, as
wall time and as process CPU time (steadier on a shared machine).
Peak memory: each way in a fresh process (beside the timing on CPU, one by one on CUDA; on
CPU with MALLOC_MMAP_THRESHOLD_=131072 so RSS follows live tensors); on CPU the peak RSS above the RSS just before the
work (VmHWM reset through /proc/self/clear_refs), on CUDA max_memory_allocated above the
allocation before the work. Results are appended to bench/results/score_bench.csv.

    python bench/bench_score.py                       # CPU, fp32, SmolLM2 (built offline)
    python bench/bench_score.py --data DATA/train/harmful_pairs.jsonl --stride 7   # harmful pairs
    python bench/bench_score.py --device cuda --dtype bfloat16 --batch-size 8 --max-length 512 \
        --host-buffers
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "score_bench.csv"
MODES = ("fwdbwd", "snip", "allgrads_per_batch", "allgrads_sum")
HOST_MODE = "snip_host"


def _status() -> dict:
    s = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the current usage (bytes) it is measured against."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _status()["VmRSS"]


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status()["VmHWM"]


def _setup(args):
    from safepatch_merge.derive.dataset import load_pairs, render_pairs
    from safepatch_merge.models.loading import load_causal_lm, load_tokenizer
    from safepatch_merge.score.snip import checkpoint_tensor_names, scored_parameters

    device = torch.device(args.device)
    model = load_causal_lm(args.model, args.dtype, device)
    tok = load_tokenizer(args.model)
    pairs = load_pairs(args.data)[:: args.stride][: args.num_examples]
    ex, _ = render_pairs(pairs, tok, args.max_length)
    if len(ex) < len(pairs):
        raise SystemExit(f"{len(pairs) - len(ex)} prompts do not fit --max-length {args.max_length}")
    params = scored_parameters(model, checkpoint_tensor_names(args.model))
    return device, model, tok, ex, params


def _setup_light(args):
    """Examples and parameter count without keeping a model in this process for long."""
    return _setup(args)


def _batches(ex, pad_id, bs, device):
    from safepatch_merge.derive.dataset import PairCollator

    col = PairCollator(pad_id)
    return [({k: v.to(device) for k, v in col(ex[i:i + bs]).items()}, len(ex[i:i + bs]))
            for i in range(0, len(ex), bs)]


def run_fwdbwd(model, batches, n_total, params, keep_scores=False):
    from safepatch_merge.derive.loss import per_example_nll

    for b, n in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = per_example_nll(logits, b["labels"]).mean() * (n / n_total)
        del logits
        loss.backward()
    scores = None
    if keep_scores:  # plain SNIP: every gradient alive, then fp32 score buffers
        with torch.no_grad():
            scores = {k: (p.detach().float() * p.grad.float()).abs_() for k, p in params.items()}
    for p in model.parameters():
        p.grad = None
    return scores


def run_allgrads_per_batch(model, batches, n_total, params):
    """The hooks' arithmetic without hooks: each batch's backward keeps all its gradients,
    then the same fused op adds (n_b/N)·θ⊙g into fp32 buffers that live across batches."""
    from safepatch_merge.derive.loss import per_example_nll
    from safepatch_merge.ops import saliency_accumulate_, saliency_finalize_

    scores = {}  # made after the first backward, as late as possible
    for b, n in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = per_example_nll(logits, b["labels"]).mean()
        del logits
        loss.backward()
        with torch.no_grad():
            for k, p in params.items():
                if k not in scores:
                    scores[k] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                saliency_accumulate_(scores[k], p.detach(), p.grad, n / n_total)
                p.grad = None
    for s in scores.values():
        saliency_finalize_(s)
    return scores


def run_snip(model, ex, pad_id, params, bs, buffers="device"):
    from safepatch_merge.score.snip import snip_scores

    return snip_scores(model, ex, pad_id, params, batch_size=bs, buffers=buffers)[0]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker_memory(args) -> dict:
    device, model, tok, ex, params = _setup(args)
    batches = _batches(ex, tok.pad_token_id, args.batch_size, device)
    # warm-up on one short example: fault in the kernels' code pages before measuring, then
    # hand freed heap back to the OS so the baseline is the model and the data only
    run_fwdbwd(model, _batches(ex[:1], tok.pad_token_id, 1, device), 1, params)
    if device.type == "cpu":
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _reset_peak(device)
    if args.worker == "fwdbwd":
        run_fwdbwd(model, batches, len(ex), params)
    elif args.worker == "allgrads_sum":
        run_fwdbwd(model, batches, len(ex), params, keep_scores=True)
    elif args.worker == "allgrads_per_batch":
        run_allgrads_per_batch(model, batches, len(ex), params)
    else:
        run_snip(model, ex, tok.pad_token_id, params, args.batch_size,
                 "host" if args.worker == HOST_MODE else "device")
    _sync(device)
    return {"mode": args.worker, "peak_bytes_above_start": _peak(device) - base}


def timing(args) -> dict:
    device, model, tok, ex, params = _setup(args)
    batches = _batches(ex, tok.pad_token_id, args.batch_size, device)
    modes = ("fwdbwd", "snip") + ((HOST_MODE,) if args.host_buffers else ())
    t = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    for r in range(args.repeats + 1):  # round 0 warms up
        for mode in modes:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if mode == "fwdbwd":
                run_fwdbwd(model, batches, len(ex), params)
            else:
                run_snip(model, ex, tok.pad_token_id, params, args.batch_size,
                         "host" if mode == HOST_MODE else "device")
            _sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            print(f"round {r} {mode}: wall {dt:.2f} s, cpu {dc:.2f} s", file=sys.stderr, flush=True)
            if r:
                t[mode].append(dt)
                cpu[mode].append(dc)
    tokens = sum(int(b["attention_mask"].sum()) for b, _ in batches)
    n_params = sum(p.numel() for p in params.values())
    return {"times": t, "cpu_times": cpu, "tokens": tokens, "batches": [n for _, n in batches],
            "scored_parameters": n_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir (default: SmolLM2-135M-Instruct, built offline)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--num-examples", type=int, default=3, help="scoring set size (last batch shorter)")
    ap.add_argument("--data", help="pairs file (JSONL/JSON/CSV with prompt and response; default: "
                                   "the packaged benign reference answers)")
    ap.add_argument("--stride", type=int, default=1,
                    help="take every N-th pair (7 spreads the scoring set over the harmful "
                         "pairs' prompts)")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--random-weights", metavar="DIR",
                    help="use (and create if absent) a random-weight SmolLM2-shaped model in DIR "
                         "instead of the real one (machines that cannot fetch it)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--skip-timing", action="store_true", help="peak memory only")
    ap.add_argument("--host-buffers", action="store_true",
                    help="also time and measure SNIP with its score buffers in host memory")
    ap.add_argument("--worker", choices=MODES + (HOST_MODE,), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_weights and not args.worker:
        sys.path.insert(0, str(HERE))
        from random_model import write_random_smollm2

        args.model = str(write_random_smollm2(args.random_weights))
    if args.model is None:
        from safepatch_merge.models.smollm2 import ensure_smollm2

        args.model = str(ensure_smollm2())
    if args.data is None:
        from safepatch_merge.eval.utility import default_reference_path

        args.data = str(default_reference_path())
    if args.worker:
        print("RESULT " + json.dumps(worker_memory(args)))
        return

    # Peak memory: one fresh process per way. On CPU they run beside the timing (each
    # measures only its own RSS; timing is also reported as CPU time); on CUDA all at once
    # (each reads its own max_memory_allocated), and the timing waits until they are done.
    procs = {}
    for mode in MODES + ((HOST_MODE,) if args.host_buffers else ()):
        cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--device",
               args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
               "--num-examples", str(args.num_examples), "--max-length", str(args.max_length),
               "--data", args.data, "--stride", str(args.stride),
               "--threads", str(args.threads or 1)]
        # a fixed mmap threshold: glibc then maps every tensor >= 128 KiB on its own and
        # unmaps it when freed, so peak RSS follows live tensors, not heap fragmentation
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        procs[mode] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True, env=env)
    if args.device == "cuda":
        for proc in procs.values():
            proc.wait()
    tm = timing(args) if not args.skip_timing else None
    mem = {}
    for mode, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"memory worker {mode} failed (exit {proc.returncode})")
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        mem[mode] = json.loads(line[7:])["peak_bytes_above_start"]

    if tm is None:  # memory only: same batches, timing fields left empty
        _, _, tok, ex, params = _setup_light(args)
        bt = [len(ex[i:i + args.batch_size]) for i in range(0, len(ex), args.batch_size)]
        nan = {m: [float("nan")] for m in ("fwdbwd", "snip", HOST_MODE)}
        tm = {"times": nan, "cpu_times": nan,
              "tokens": sum(len(e.input_ids) for e in ex), "batches": bt,
              "scored_parameters": sum(p.numel() for p in params.values())}
    med = {k: statistics.median(v) for k, v in tm["times"].items()}
    medc = {k: statistics.median(v) for k, v in tm["cpu_times"].items()}
    from safepatch_merge.ops import backend_for

    dev = torch.device(args.device)
    row = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, cwd=HERE).stdout.strip(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                  f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads",
        "model": Path(args.model).name, "data": f"{Path(args.data).name}[::{args.stride}]",
        "dtype": args.dtype, "ops_backend": backend_for(dev)[0],
        "batches": "+".join(map(str, tm["batches"])), "max_length": args.max_length,
        "tokens": tm["tokens"], "scored_parameters": tm["scored_parameters"],
        "repeats": args.repeats,
        "fwdbwd_s": round(med["fwdbwd"], 4), "snip_s": round(med["snip"], 4),
        "time_ratio": round(med["snip"] / med["fwdbwd"], 4),
        "fwdbwd_cpu_s": round(medc["fwdbwd"], 4), "snip_cpu_s": round(medc["snip"], 4),
        "cpu_time_ratio": round(medc["snip"] / medc["fwdbwd"], 4),
        "peak_fwdbwd_MB": round(mem["fwdbwd"] / 1e6, 1), "peak_snip_MB": round(mem["snip"] / 1e6, 1),
        "peak_allgrads_per_batch_MB": round(mem["allgrads_per_batch"] / 1e6, 1),
        "peak_allgrads_sum_MB": round(mem["allgrads_sum"] / 1e6, 1),
        "memory_ratio_vs_allgrads_per_batch": round(mem["snip"] / mem["allgrads_per_batch"], 4),
        "memory_ratio_vs_allgrads_sum": round(mem["snip"] / mem["allgrads_sum"], 4),
        "torch": torch.__version__,
    }
    if args.host_buffers:
        row.update({
            "snip_host_s": round(med[HOST_MODE], 4) if HOST_MODE in med else float("nan"),
            "host_time_ratio": round(med[HOST_MODE] / med["fwdbwd"], 4) if HOST_MODE in med
            else float("nan"),
            "peak_snip_host_MB": round(mem[HOST_MODE] / 1e6, 1),
            "host_memory_ratio_vs_allgrads_per_batch": round(mem[HOST_MODE] / mem["allgrads_per_batch"], 4),
            "host_memory_ratio_vs_allgrads_sum": round(mem[HOST_MODE] / mem["allgrads_sum"], 4),
        })
    _append_row(Path(args.out), row)
    print(json.dumps(row, indent=1))
    print("wall " + " ".join(f"{m} {v}" for m, v in tm["times"].items()))
    print("cpu " + " ".join(f"{m} {v}" for m, v in tm["cpu_times"].items()))


def _append_row(out: Path, row: dict) -> None:
    """Append `row` to the CSV at `out`; a row with new columns rewrites the file under the
    union of the columns (older rows get empty cells)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, fields = [], list(row)
    if out.exists():
        with open(out, newline="") as f:
            r = csv.DictReader(f)
            rows = list(r)
            fields = list(r.fieldnames or []) + [k for k in row if k not in (r.fieldnames or [])]
    rows.append(row)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
