"""`safepatch sweep`: a grid over top rates, scales and retention from existing patches and
scores — merges only, no gradients — each point evaluated on small prompt subsets; a table and
a trade-off plot (compliance on harmful prompts vs over-refusal, utility as colour) with the
Pareto front marked. API twin: safepatch_merge.pipeline.sweep.sweep."""
from __future__ import annotations

import argparse

from ..config_fields import add_arguments, from_args
from ..pipeline.sweep_config import SWEEP_GROUPS, SweepConfig
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
    groups = {title: p.add_argument_group(title) for title in SWEEP_GROUPS}
    src = groups[SWEEP_GROUPS[0]]
    src.add_argument("--from-run", metavar="RUN_DIR", help="a `safepatch run` output directory")
    src.add_argument("--stage", help="stage name of --from-run (default: the last)")
    add_arguments(p, SweepConfig, groups=groups)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..pipeline.sweep import from_run, sweep

    src = {}
    if args.from_run:
        src = from_run(args.from_run, args.stage)
    elif args.stage:
        raise ConfigError("--stage needs --from-run")
    if "backbone" not in src and args.backbone is None:
        raise ConfigError("give --from-run RUN_DIR or --backbone (with patches and scores)")
    for k in ("patch_se", "patch_osm", "scores_se", "scores_osm"):
        src.setdefault(k, None)
    cfg = from_args(SweepConfig, args, base=src)  # a flag given overrides the run's value
    res = sweep(cfg, args.out, progress=args.progress)
    print(res["table"])
    print(f"table: {res['csv']}  plot: {res['plot']}")
    return 0
