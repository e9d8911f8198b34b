"""Training throughput of `derive` (tokens/s, prompt + response tokens) with the settings used.

Runs safepatch_merge.derive.train.derive_patch for a few steps on prompt/response pairs
(--data FILE, default the packaged benign reference answers) with each
requested setting and appends one row per setting to bench/results/train_bench.csv (device,
commit, precision, full/LoRA, batch, length, steps, tokens/s from the run's derive_record.json;
held-out evaluation and saving are outside the timed loop).

    python bench/bench_train.py                                  # CPU: fp32, bf16-mixed, LoRA
    python bench/bench_train.py --device cuda --batch-size 8 --max-length 512 --steps 20 \\
        --settings fp32 bf16-mixed bf16-mixed+lora
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train_bench.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir (default: SmolLM2-135M-Instruct, built offline)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--settings", nargs="+", default=["fp32", "bf16-mixed", "fp32+lora"],
                    help="PRECISION[+lora] (precision: fp32, bf16-mixed, bf16)")
    ap.add_argument("--objective", default="ga")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--data", help="pairs file (JSONL/JSON/CSV with prompt and response; default: "
                                   "the packaged benign reference answers)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--random-weights", metavar="DIR",
                    help="use (and create if absent) a random-weight SmolLM2-shaped model in DIR")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from safepatch_merge.derive.train import DeriveConfig, derive_patch
    from safepatch_merge.eval.utility import default_reference_path

    if args.random_weights:
        import sys

        sys.path.insert(0, str(HERE))
        from random_model import write_random_smollm2

        args.model = str(write_random_smollm2(args.random_weights))
    if args.model is None:
        from safepatch_merge.models.smollm2 import ensure_smollm2

        args.model = str(ensure_smollm2())
    data = Path(args.data) if args.data else default_reference_path()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()
    device = (torch.cuda.get_device_name(0) if args.device == "cuda" else
              f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    rows = []
    for setting in args.settings:
        precision, _, lora = setting.partition("+")
        cfg = DeriveConfig(objective=args.objective, learning_rate=args.lr, max_steps=args.steps,
                           batch_size=args.batch_size, max_length=args.max_length,
                           heldout=0.0, limit=8 * args.batch_size * args.steps,
                           precision=precision, lora=lora == "lora", device=args.device, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            rec = derive_patch(args.model, data, Path(tmp) / "patch", cfg, progress=False)
        th = rec["throughput"]
        rows.append({
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "device": device, "model": Path(args.model).name,
            "objective": args.objective, "precision": precision,
            "kind": "lora" if lora == "lora" else "full",
            "trainable_parameters": rec["trainable_parameters"],
            "batch_size": args.batch_size, "max_length": args.max_length,
            "steps": rec["steps"], "tokens": th["tokens"], "seconds": round(th["seconds"], 3),
            "tokens_per_s": round(th["tokens_per_s"], 1),
            "cpu_seconds": round(th["cpu_seconds"], 3), "threads": th["threads"],
            "tokens_per_cpu_s": round(th["tokens"] / th["cpu_seconds"], 1),
            "train_dtype": th["train_dtype"],
            "mixed_precision": th["mixed_precision"], "torch": torch.__version__,
        })
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
