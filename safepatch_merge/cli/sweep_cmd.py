"""`safepatch sweep`: a grid over top rates, scales and retention from existing patches and
scores — merges only, no gradients — each point evaluated on small prompt subsets; a table and
a trade-off plot (compliance on harmful prompts vs over-refusal, utility as colour) with the
Pareto front marked. API twin: safepatch_merge.pipeline.sweep.sweep."""
from __future__ import annotations

import argparse

from .options import add_output

EPILOG = """examples:
  # the patches and scores of a finished `safepatch run` (last stage), 3x3 top rates
  safepatch sweep --from-run runs/smollm2 -o sweeps/rates \\
      --top-rate-se 0.05 0.1 0.2 --top-rate-osm 0.05 0.1 0.2

  # scales too, explicit inputs, 32 prompts per suite, keep the merged models
  safepatch sweep --backbone ./model --patch-se se --patch-osm osm --scores-se se_s \\
      --scores-osm osm_s -o sweeps/scales --alpha 0.5 1 2 --beta 0 0.5 1 --limit 32 --keep-models

Outputs: OUT/sweep.md and sweep.csv (one row per point: rates, scales, compliance on harmful
prompts, XSTest over-refusal, degeneration, each with a 95% interval, utility perplexity,
achieved densities, Pareto flag), OUT/sweep.png. Reruns skip finished points; adding values to
an axis evaluates only the new points. Merged models are deleted after evaluation unless
--keep-models."""


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="grid of merges (rates, scales) from existing patches and "
                       "scores, evaluated, with a Pareto plot",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output(p, "sweep directory (reused by reruns)")
    src = p.add_argument_group("inputs (either --from-run or the explicit paths)")
    src.add_argument("--from-run", metavar="RUN_DIR", help="a `safepatch run` output directory")
    src.add_argument("--stage", help="stage name of --from-run (default: the last)")
    for k in ("backbone", "patch-se", "patch-osm", "scores-se", "scores-osm"):
        src.add_argument(f"--{k}")
    g = p.add_argument_group("grid (each a list; the product is swept)")
    g.add_argument("--top-rate-se", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    g.add_argument("--top-rate-osm", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    g.add_argument("--alpha", type=float, nargs="+", default=[1.0])
    g.add_argument("--beta", type=float, nargs="+", default=[1.0])
    g.add_argument("--retention", type=float, nargs="+", default=[1.0])
    g.add_argument("--mask-mode", default="difference",
                   choices=("difference", "intersection", "topk", "none"))
    g.add_argument("--granularity", default="global", choices=("global", "layer", "tensor"))
    g.add_argument("--seed", type=int, default=0, help="retention draw seed")
    e = p.add_argument_group("evaluation")
    e.add_argument("--suite", action="append", dest="suites", help="repeat; default xstest, "
                   "harmbench")
    e.add_argument("--limit", type=int, default=16, help="prompts per suite (default 16)")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--utility-limit", type=int, default=16)
    e.add_argument("--no-utility", action="store_true")
    e.add_argument("--dedup-against", action="append", default=None, metavar="TRAIN_FILE",
                   help="drop eval prompts found in this file (default with --from-run: the "
                        "run's data files)")
    e.add_argument("--no-backbone", action="store_true", help="do not evaluate the backbone")
    e.add_argument("--device", default="auto", help="eval device")
    r = p.add_argument_group("merge")
    r.add_argument("--merge-device", default="cpu")
    r.add_argument("--backend", choices=("auto", "reference", "cpp", "triton"))
    r.add_argument("--max-memory")
    r.add_argument("--output-dtype", default="auto",
                   choices=("auto", "float32", "bfloat16", "float16"))
    r.add_argument("--keep-models", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..pipeline.sweep import SweepConfig, from_run, sweep

    src = {}
    if args.from_run:
        src = from_run(args.from_run, args.stage)
    elif args.stage:
        raise ConfigError("--stage needs --from-run")
    for k in ("backbone", "patch_se", "patch_osm", "scores_se", "scores_osm"):
        if getattr(args, k) is not None:
            src[k] = getattr(args, k)
    if "backbone" not in src:
        raise ConfigError("give --from-run RUN_DIR or --backbone (with patches and scores)")
    for k in ("patch_se", "patch_osm", "scores_se", "scores_osm"):
        src.setdefault(k, None)
    if args.dedup_against is not None:
        src["dedup_against"] = args.dedup_against
    cfg = SweepConfig(
        **src, top_rate_se=args.top_rate_se, top_rate_osm=args.top_rate_osm, alpha=args.alpha,
        beta=args.beta, retention=args.retention, mask_mode=args.mask_mode,
        granularity=args.granularity, seed=args.seed, output_dtype=args.output_dtype,
        suites=args.suites or ["xstest", "harmbench"], limit=args.limit,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        utility=not args.no_utility, utility_limit=args.utility_limit,
        eval_backbone=not args.no_backbone, device=args.device, merge_device=args.merge_device,
        backend=args.backend, max_memory=args.max_memory, keep_models=args.keep_models)
    res = sweep(cfg, args.out, progress=args.progress)
    print(res["table"])
    print(f"table: {res['csv']}  plot: {res['plot']}")
    return 0
