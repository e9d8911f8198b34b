"""`safepatch derive`: train a safety patch — a safety-enhancement (SE) objective (ga: the
paper's gradient ascent on harmful responses; npo; graddiff; refusal_sft) or gradient descent
for the over-safety-mitigation (OSM) patch (gd).
API twin: safepatch_merge.derive.train.derive_patch."""
from __future__ import annotations

import argparse
import json

from .options import add_output

# The values of derive.train.PRECISIONS / STOP_ON, derive.objectives.OBJECTIVES and
# derive.behaviour.METRICS, spelled here so that `--help` needs no torch
# (tests/test_cli_conventions.py checks that they agree).
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
STOP_ON = ("train", "heldout")
OBJECTIVES = ("ga", "npo", "graddiff", "refusal_sft", "gd")
METRICS = ("refusal_rate", "compliance_rate", "non_answer_rate", "degenerate_rate", "perplexity")

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

  # SE patch by NPO, embeddings / head / norms frozen, stopped when 80% of the calibration
  # prompts are refused, or (weights of the check before) when the benign reference
  # perplexity reaches 9
  safepatch derive ./model --data harmful_pairs.jsonl --objective npo --npo-beta 0.1 \\
      --train-exclude 'model.embed_tokens.*' 'lm_head.*' '*norm*' -o patches/se_npo \\
      --calib-prompts calib_harmful.jsonl --calib-reference benign_answers.jsonl \\
      --stop-when 'refusal_rate>=0.8' --guard-when 'perplexity>=9' --calib-every 5

  # gradient difference: ascent on D_h, descent on benign Alpaca answers (λ = 1)
  safepatch derive ./model --data harmful_pairs.jsonl --objective graddiff \\
      --retain-data alpaca_en_demo.json --retain-weight 1 -o patches/se_gd

  # on-policy D_h: the model's own compliant answers to the data's prompts
  safepatch derive ./model --data harmful_prompts.jsonl --objective ga --on-policy -o patches/se

  # refusal SFT: descent on (harmful prompt -> refusal) pairs (Alpaca-style fields)
  safepatch derive ./model --data safety_refusals.json --objective refusal_sft \\
      --prompt-field instruction --input-field input --response-field output -o patches/se_ref

Outputs in OUT: the patched model (safetensors, config, tokenizer with chat template),
for --lora also OUT/adapter (or only the adapter with --no-merged), derive_record.json
(data hash, split, hyperparameters, seed, versions, stop reason, tokens/s), nll_curve.csv
and nll_curve.png (plus calibration.jsonl with a behavioural stop, OUT/on_policy/ with
--on-policy).

Objectives (per batch; NLL = an example's mean response-token NLL, mean over examples):
  ga           -NLL on D_h (gradient ascent): the paper's SE patch
  npo          NPO (Zhang et al. 2024): (2/β)·mean softplus(β·(s − s_ref)), s = the
               example's summed response log-likelihood, s_ref under the frozen start model
  graddiff     -NLL(D_h) + λ·NLL(retain set)
  refusal_sft  +NLL on (harmful prompt -> refusal) pairs given as --data
  gd           +NLL on D_h (gradient descent): the paper's OSM patch
npo, graddiff, refusal_sft, confinement, on-policy D_h and the behavioural stop are ours;
defaults are ours too (the paper states none)."""


def add_parser(sub) -> None:
    p = sub.add_parser("derive", help="train a patch (ga: safety-enhancement, gd: over-safety "
                       "mitigation)", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbone", help="local Hugging Face model directory (the aligned model θ)")
    p.add_argument("--data", required=True, help="harmful pairs: .jsonl/.json/.csv file or a "
                   "Hugging Face dataset name (needs the `datasets` library)")
    p.add_argument("--objective", required=True, choices=OBJECTIVES,
                   help="SE: ga (the paper's gradient ascent), npo, graddiff, refusal_sft; "
                        "OSM: gd (gradient descent)")
    add_output(p, "output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    d = p.add_argument_group("data")
    d.add_argument("--prompt-field", default="prompt")
    d.add_argument("--response-field", default="response")
    d.add_argument("--input-field", help="a column appended to the prompt after a newline "
                   "when non-empty (Alpaca's input)")
    d.add_argument("--hf-split", default="train", help="split of a dataset name")
    d.add_argument("--limit", type=int, help="use the first N pairs")
    d.add_argument("--heldout", type=float, default=0.1,
                   help="fraction of distinct prompts held out (default 0.1; 0 = none)")
    d.add_argument("--max-length", type=int, default=512, help="tokens per example (default 512)")
    d.add_argument("--system-prompt", help="system message before every prompt")
    d.add_argument("--chat-template", help="Jinja chat template (file or string) if the "
                   "tokenizer has none or another is wanted")
    t = p.add_argument_group("training")
    t.add_argument("--lr", dest="learning_rate", type=float, default=1e-5,
                   help="learning rate (default 1e-5)")
    t.add_argument("--max-steps", type=int, default=100, help="step budget (default 100)")
    t.add_argument("--epochs", type=int, help="stop after this many passes over the data")
    t.add_argument("--batch-size", type=int, default=4, help="per device (default 4)")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip (default 1.0)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--lr-scheduler", default="constant",
                   help="transformers scheduler name: constant, linear, cosine, ...")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--nll-ceiling", type=float,
                   help="ga/npo/graddiff: stop when the training pairs' NLL reaches this")
    t.add_argument("--nll-floor", type=float,
                   help="gd/refusal_sft: stop when the NLL falls to this")
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
    o = p.add_argument_group("objectives")
    o.add_argument("--npo-beta", type=float, default=0.1,
                   help="npo: inverse temperature β of NPO (default 0.1; not the merge's β)")
    o.add_argument("--retain-data", help="graddiff: retain set file (benign prompt/answer pairs)")
    o.add_argument("--retain-weight", type=float, default=1.0, help="graddiff: λ (default 1)")
    o.add_argument("--retain-prompt-field", default="instruction")
    o.add_argument("--retain-response-field", default="output")
    o.add_argument("--retain-input-field", default="input",
                   help="appended to the retain prompt when non-empty (default: input)")
    o.add_argument("--retain-limit", type=int, help="use the first N retain pairs")
    o.add_argument("--retain-batch-size", type=int, help="default: --batch-size")
    o.add_argument("--on-policy", action="store_true",
                   help="ga/npo/graddiff: train on the backbone's own greedy answers to the "
                        "data's prompts, kept where judged compliance (responses in --data "
                        "are not needed)")
    o.add_argument("--on-policy-max-new-tokens", type=int, default=64)
    o.add_argument("--on-policy-min-pairs", type=int, default=8,
                   help="fewer compliant answers than this is an error (default 8)")
    c = p.add_argument_group("confinement (every objective)")
    c.add_argument("--train-include", nargs="+", default=[], metavar="GLOB",
                   help="train only parameters whose tensor name matches one of these")
    c.add_argument("--train-exclude", nargs="+", default=[], metavar="GLOB",
                   help="freeze parameters matching any of these, e.g. 'model.embed_tokens.*' "
                        "'lm_head.*' '*norm*' (frozen tensors are saved byte-identical)")
    b = p.add_argument_group("behavioural stop (every objective)")
    b.add_argument("--stop-when", nargs="+", default=[], metavar="RULE",
                   help=f"targets: METRIC>=X or METRIC<=X, METRIC in {', '.join(METRICS)}; the "
                        "first rule that holds at a calibration check stops the run with the "
                        "weights it measured")
    b.add_argument("--guard-when", nargs="+", default=[], metavar="RULE",
                   help="guards, same form (e.g. 'perplexity>=9'): the first that holds stops "
                        "the run and restores the weights of the last check where none held")
    b.add_argument("--calib-prompts", help="harmful calibration prompts (JSONL/JSON/CSV), "
                   "answered greedily at every check")
    b.add_argument("--calib-reference", help="benign prompt/response pairs (JSONL) whose "
                   "perplexity is measured at every check")
    b.add_argument("--calib-every", type=int, default=10, help="check every N steps (default 10)")
    b.add_argument("--calib-limit", type=int, help="first N calibration prompts")
    b.add_argument("--calib-reference-limit", type=int, help="first N reference pairs")
    b.add_argument("--calib-max-new-tokens", type=int, default=48)
    b.add_argument("--calib-reference-tokens", type=int, default=256,
                   help="response tokens per reference answer (default 256)")
    b.add_argument("--calib-batch-size", type=int, default=16)
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora", action="store_true", help="train a LoRA adapter (PEFT)")
    lo.add_argument("--lora-r", type=int, default=16)
    lo.add_argument("--lora-alpha", type=float, default=32.0)
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--lora-target", nargs="+", default=["all-linear"],
                    help="module names (default all-linear: every linear layer but the head)")
    lo.add_argument("--no-merged", dest="save_merged", action="store_false",
                    help="write only the adapter (scoring then merges it in memory)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import fields

    from ..derive.train import DeriveConfig, derive_patch

    cfg = DeriveConfig(**{f.name: getattr(args, f.name) for f in fields(DeriveConfig)
                          if hasattr(args, f.name)})
    rec = derive_patch(args.backbone, args.data, args.out, cfg, overwrite=args.overwrite,
                       progress=args.progress)
    if rec is not None:  # main process
        print(json.dumps({"out": args.out, "objective": rec["objective"], "steps": rec["steps"],
                          "stop_reason": rec["stop_reason"], "stop_rule": rec["stop_rule"],
                          "initial_heldout_nll": rec["initial_heldout_nll"],
                          "final_heldout_nll": rec["final_heldout_nll"],
                          "tokens_per_s": rec["throughput"]["tokens_per_s"]}))
    return 0
