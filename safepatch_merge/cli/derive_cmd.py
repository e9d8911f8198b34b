"""`safepatch derive`: train a safety patch on harmful pairs — gradient ascent (the
safety-enhancement patch, SE) or gradient descent (the over-safety-mitigation patch, OSM).
API twin: safepatch_merge.derive.train.derive_patch."""
from __future__ import annotations

import argparse
import json

from .options import add_output

# The values of derive.train.PRECISIONS / STOP_ON, spelled here so that `--help` needs no torch
# (tests/test_cli_conventions.py checks that they agree).
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
STOP_ON = ("train", "heldout")

EPILOG = """examples:
  # SE patch: gradient ascent, full parameters, stopped at NLL 8 nats/token or 200 steps
  safepatch derive ./SmolLM2-135M-Instruct --data harmful_pairs.jsonl --objective ga \\
      -o patches/se --lr 1e-5 --max-steps 200 --nll-ceiling 8

  # OSM patch: gradient descent, LoRA r=16 on all linear layers, bf16 autocast
  safepatch derive ./SmolLM2-135M-Instruct --data harmful_pairs.jsonl --objective gd \\
      -o patches/osm --lora --lora-r 16 --lr 2e-4 --precision bf16-mixed

  # several GPUs (DDP/FSDP/DeepSpeed as set in the accelerate config)
  accelerate launch -m safepatch_merge derive ./model --data pairs.csv --objective ga -o se

  # other field names
  safepatch derive ./model --data pairs.csv --prompt-field instruction --response-field output ...

Outputs in OUT: the patched model (safetensors, config, tokenizer with chat template),
for --lora also OUT/adapter (or only the adapter with --no-merged), derive_record.json
(data hash, split, hyperparameters, seed, versions, stop reason, tokens/s), nll_curve.csv
and nll_curve.png. The loss is the mean over examples of each example's mean response-token
NLL (docs/design.md §1.2); gd minimises it, ga maximises it. Defaults are ours; the paper states none."""


def add_parser(sub) -> None:
    p = sub.add_parser("derive", help="train a patch (ga: safety-enhancement, gd: over-safety "
                       "mitigation)", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbone", help="local Hugging Face model directory (the aligned model θ)")
    p.add_argument("--data", required=True, help="harmful pairs: .jsonl/.json/.csv file or a "
                   "Hugging Face dataset name (needs the `datasets` library)")
    p.add_argument("--objective", required=True, choices=("ga", "gd"),
                   help="ga = gradient ascent (SE patch), gd = gradient descent (OSM patch)")
    add_output(p, "output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    d = p.add_argument_group("data")
    d.add_argument("--prompt-field", default="prompt")
    d.add_argument("--response-field", default="response")
    d.add_argument("--hf-split", default="train", help="split of a dataset name")
    d.add_argument("--limit", type=int, help="use the first N pairs")
    d.add_argument("--heldout", type=float, default=0.1,
                   help="fraction of distinct prompts held out (default 0.1; 0 = none)")
    d.add_argument("--max-length", type=int, default=512, help="tokens per example (default 512)")
    d.add_argument("--system-prompt", help="system message before every prompt")
    d.add_argument("--chat-template", help="Jinja chat template (file or string) if the "
                   "tokenizer has none or another is wanted")
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    t.add_argument("--max-steps", type=int, default=100, help="step budget (default 100)")
    t.add_argument("--epochs", type=int, help="stop after this many passes over the data")
    t.add_argument("--batch-size", type=int, default=4, help="per device (default 4)")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip (default 1.0)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--lr-scheduler", default="constant",
                   help="transformers scheduler name: constant, linear, cosine, ...")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--nll-ceiling", type=float, help="ga: stop when the NLL reaches this")
    t.add_argument("--nll-floor", type=float, help="gd: stop when the NLL falls to this")
    t.add_argument("--stop-on", choices=STOP_ON, default="train",
                   help="which NLL the ceiling/floor watches (default: the train batch)")
    t.add_argument("--eval-every", type=int, default=10, help="held-out NLL every N steps")
    t.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default) | bf16-mixed (fp32 weights, bf16 autocast, CPU too) | "
                        "bf16 (bf16 weights)")
    t.add_argument("--save-dtype", default="auto",
                   help="dtype of the written weights (default auto: the training dtype, "
                        "float32 unless --precision bf16; bfloat16 rounds small updates away)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--max-shard-size", default="5GB")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora", action="store_true", help="train a LoRA adapter (PEFT)")
    lo.add_argument("--lora-r", type=int, default=16)
    lo.add_argument("--lora-alpha", type=float, default=32.0)
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--lora-target", nargs="+", default=["all-linear"],
                    help="module names (default all-linear: every linear layer but the head)")
    lo.add_argument("--no-merged", action="store_true",
                    help="write only the adapter (scoring then merges it in memory)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..derive.train import DeriveConfig, derive_patch

    cfg = DeriveConfig(
        objective=args.objective, learning_rate=args.lr, max_steps=args.max_steps,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
        nll_ceiling=args.nll_ceiling, nll_floor=args.nll_floor, stop_on=args.stop_on,
        heldout=args.heldout, eval_every=args.eval_every, max_length=args.max_length,
        limit=args.limit, prompt_field=args.prompt_field, response_field=args.response_field,
        hf_split=args.hf_split, system_prompt=args.system_prompt,
        chat_template=args.chat_template, precision=args.precision, save_dtype=args.save_dtype,
        seed=args.seed, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_target=args.lora_target,
        save_merged=not args.no_merged, gradient_checkpointing=args.gradient_checkpointing,
        device=args.device, max_shard_size=args.max_shard_size)
    rec = derive_patch(args.backbone, args.data, args.out, cfg, overwrite=args.overwrite,
                       progress=args.progress)
    if rec is not None:  # main process
        print(json.dumps({"out": args.out, "steps": rec["steps"], "stop_reason": rec["stop_reason"],
                          "initial_heldout_nll": rec["initial_heldout_nll"],
                          "final_heldout_nll": rec["final_heldout_nll"],
                          "tokens_per_s": rec["throughput"]["tokens_per_s"]}))
    return 0
