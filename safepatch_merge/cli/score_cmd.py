"""`safepatch score`: saliency of a patch — SNIP |θ_X ⊙ ∇L(D_s)| at the patched model (or the
magnitude |θ_X − θ|) — written as a score directory the merge engine reads.
API twin: safepatch_merge.score.api.score_patch."""
from __future__ import annotations

import argparse
import json

from ..config_fields import add_arguments, from_args
from ..score.config import ScoreConfig
from .options import add_output

EPILOG = """examples:
  # SNIP on the harmful responses (the default loss), fp32 scores
  safepatch score patches/se --data harmful_pairs.jsonl -o scores/se
  safepatch score patches/osm --data harmful_pairs.jsonl -o scores/osm

  # SNIP on D_h's questions (the paper's reading): only the user question's own tokens
  safepatch score patches/se --data harmful_pairs.jsonl --saliency-on questions -o scores/se_q

  # a LoRA adapter (scored over the merged weight), whole rendered prompt, on the GPU
  safepatch score patches/osm/adapter --backbone ./model --data pairs.jsonl \\
      --loss prompt_nll --device cuda -o scores/osm

  # magnitude |θ_X − θ| (no data, no gradients)
  safepatch score patches/se --backbone ./model --loss magnitude -o scores/se_mag

  # several GPUs: each holds the model and scores its share of the batches
  torchrun --nproc-per-node 8 -m safepatch_merge score patches/se --data pairs.jsonl -o scores/se
  # parameters sharded with FSDP2 across the GPUs (a model too large for one)
  torchrun --nproc-per-node 8 -m safepatch_merge score patches/se --data pairs.jsonl \\
      --parallel fsdp -o scores/se

Output: safetensors shards of scores under the model's tensor names (float32 unless
--score-dtype), histograms.safetensors (digit-0 radix histograms) and score_info.json.
SNIP adds the signed products θ⊙∇L_b, weighted by each batch's share of the set, and takes
|·| once at the end: the number plain autograd gives over the whole set, whatever the batch
size. --accumulation abs_per_batch sums |θ⊙∇L_b| instead (a different, batch-size-dependent
score). The backbone defaults to the one recorded in the patch's derive_record.json.

What the loss differentiates (always the mean over examples of each example's mean token NLL):
  --saliency-on responses  (= --loss response_nll, default) the response tokens of D_h
  --saliency-on questions  (= --loss question_nll) the user question's own tokens as they
                           appear in the rendered chat template: every token carrying a
                           character of the question; not the system turn (nor a default
                           one the template inserts), role/turn markers or the generation
                           prompt; each distinct question once
  --loss prompt_nll        every token of the rendered prompt (system turn, markers,
                           question, generation prompt)"""


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="saliency scores of a patch (SNIP or magnitude)",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patch", help="patched model directory, or a LoRA adapter directory")
    p.add_argument("--data", help="scoring pairs (.jsonl/.json/.csv or dataset name)")
    add_output(p, "score directory to write")
    p.add_argument("--backbone", help="unpatched model (adapter base; magnitude); default "
                   "from the patch's derive_record.json")
    p.add_argument("--overwrite", action="store_true")
    add_arguments(p, ScoreConfig)
    p.add_argument("--backend", choices=("auto", "reference", "cpp", "triton"),
                   help="ops backend for saliency accumulation and histograms")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..ops import set_backend
    from ..score.api import SALIENCY_ON, score_patch

    # Stricter than ScoreConfig, which lets the default loss stand beside either choice: on
    # the command line --loss response_nll was typed, so it must agree.
    if args.saliency_on and args.loss and SALIENCY_ON[args.saliency_on] != args.loss:
        raise ConfigError(f"--saliency-on {args.saliency_on} contradicts --loss {args.loss}")

    if args.backend:
        set_backend(args.backend)
    cfg = from_args(ScoreConfig, args)
    info = score_patch(args.patch, args.out, args.data, args.backbone, cfg,
                       overwrite=args.overwrite, progress=args.progress)
    if info is None:  # not rank 0 of several processes
        return 0
    print(json.dumps({"out": args.out, "loss": info["loss"], "tensors": info["tensors"],
                      "num_batches": info["num_batches"]}))
    return 0
