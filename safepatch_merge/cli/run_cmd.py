"""`safepatch run CONFIG.yaml OUT_DIR`: derive both patches, score them, merge, evaluate — one
YAML-configured pipeline, continual over stages, that skips finished steps when rerun.
API twin: safepatch_merge.pipeline.run.run_pipeline."""
from __future__ import annotations

import argparse
import json

from .options import add_output_positional, say

EPILOG = """examples:
  safepatch run examples/run_gpu.yaml runs/qwen-0.5b
  safepatch run examples/run_continual.yaml runs/continual      # two stages
  safepatch run run.yaml runs/x                # again: finished steps are skipped
  safepatch run run.yaml runs/x --force        # redo every step

A minimal run.yaml (full reference: docs/run_config.md):
  backbone: ./SmolLM2-135M-Instruct
  data: harmful_pairs.jsonl          # or stages: [{name: s1, data: ...}, {name: s2, data: ...}]
  derive: {max_steps: 50, learning_rate: 1e-5, se: {nll_ceiling: 8}}
  merge:  {parameters: {top_rate_se: 0.1, top_rate_osm: 0.1, alpha: 1.0, beta: 1.0}}
  eval:   {suites: [xstest, harmbench], limit: 100, max_new_tokens: 128}

Each step (derive_se, derive_osm, score_se, score_osm, merge, eval) writes a manifest with a
hash of its options and its inputs' identities; a rerun skips a step whose hash and output are
unchanged, so changing e.g. merge.parameters reruns only merge and eval. With several stages,
stage k's patched model is stage k+1's backbone, and every stage is evaluated.
Outputs: OUT_DIR/run.json, stages/NN-NAME/{patch_*,scores_*,model,eval}, report/compare.md|png."""


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="derive, score, merge and evaluate from one YAML config",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config (YAML; see docs/run_config.md)")
    add_output_positional(p, "run directory (created; reused by reruns)")
    p.add_argument("--force", action="store_true", help="rerun every step")
    p.add_argument("--check", action="store_true",
                   help="validate the config and exit (no work)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pipeline.config import load_run_config
    from ..pipeline.run import run_pipeline

    cfg = load_run_config(args.config)
    if args.check:
        print(json.dumps(cfg.summary(), indent=1, default=str))
        return 0
    rec = run_pipeline(cfg, args.out_dir, force=args.force, progress=args.progress,
                       log_fn=say(args))
    ran = sum(s["status"] == "ran" for s in rec["steps"])
    print(f"{ran} step(s) ran, {len(rec['steps']) - ran} skipped; "
          f"patched model: {rec['final_model']}")
    if rec.get("report"):
        print(open(rec["report"]["markdown"], encoding="utf-8").read())
    return 0
