"""`safepatch derive`: train a safety patch — a safety-enhancement (SE) objective (ga: the
paper's gradient ascent on harmful responses; npo; graddiff; refusal_sft) or gradient descent
for the over-safety-mitigation (OSM) patch (gd).
API twin: safepatch_merge.derive.train.derive_patch."""
from __future__ import annotations

import argparse
import json

from ..config_fields import add_arguments, from_args
from ..derive.config import GROUPS, DeriveConfig
from .options import add_output

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
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    add_arguments(p, DeriveConfig, groups=groups)  # --objective, then the groups
    add_output(p, "output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..derive.train import derive_patch

    cfg = from_args(DeriveConfig, args)
    rec = derive_patch(args.backbone, args.data, args.out, cfg, overwrite=args.overwrite,
                       progress=args.progress)
    if rec is not None:  # main process
        print(json.dumps({"out": args.out, "objective": rec["objective"], "steps": rec["steps"],
                          "stop_reason": rec["stop_reason"], "stop_rule": rec["stop_rule"],
                          "initial_heldout_nll": rec["initial_heldout_nll"],
                          "final_heldout_nll": rec["final_heldout_nll"],
                          "tokens_per_s": rec["throughput"]["tokens_per_s"]}))
    return 0
