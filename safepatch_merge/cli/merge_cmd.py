"""`safepatch merge CONFIG.yaml OUT_DIR`: streaming merge into a Hugging Face model directory.

Python twin: :func:`safepatch_merge.merge.merge`.
"""
from __future__ import annotations

import argparse
import json
import math

from .options import add_output_positional

EPILOG = """\
examples:
  safepatch merge merge.yaml out/patched-model
  safepatch merge merge.yaml out/patched-model --max-memory 2GiB --resume
  safepatch merge merge.yaml out/patched-model --device cuda --backend triton
  safepatch merge merge.yaml out/patched-model --dry-run     # plan, thresholds, memory

A minimal merge.yaml (full schema: docs/merge_config.md):
  backbone: Qwen/Qwen2.5-0.5B-Instruct
  patches: {se: runs/se-patch, osm: runs/osm-patch}
  scores:  {se: runs/se-scores, osm: runs/osm-scores}
  parameters: {top_rate_se: 0.1, top_rate_osm: 0.1, alpha: 1.0, beta: 1.0}
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge patches into a backbone, streaming (SafePatching)",
        description="Merge safety patches into a backbone as a YAML config says, streaming "
                    "tensors from disk under a memory budget. The output appears at OUT_DIR "
                    "only when complete (built in OUT_DIR.partial, resumable).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="merge config (YAML)")
    add_output_positional(p, "output model directory")
    p.add_argument("--backend", choices=("auto", "reference", "cpp", "triton"), default=None,
                   help="op backend (default: automatic by device)")
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="resident memory budget, e.g. 1GiB or 4GB (default: 1/4 of RAM, <= 16 GiB)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge (OUT_DIR.partial)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (tensors, bytes, thresholds, estimated memory) and exit")
    p.add_argument("--stats", default=None, metavar="JSON",
                   help="also write the merge's timings (seconds per stage), bytes and plan "
                        "to this JSON file")
    p.set_defaults(func=run)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plan) -> str:
    """Human-readable plan of a dry run (plan: engine.MergePlan)."""
    lines = [f"method: {plan.method}  backend: {plan.backend}  device: {plan.device}",
             f"tensors: {plan.tensors} ({plan.patched_tensors} patched), shards: {plan.shards}",
             f"read: {_gib(plan.read_bytes)}, write: {_gib(plan.write_bytes)}",
             f"chunk: {plan.chunk_elements} elements; memory budget {_gib(plan.max_memory)}, "
             f"estimated peak {_gib(plan.estimated_peak_memory)}"]
    s = plan.summary or {}
    for side, sel in (s.get("selection") or {}).items():
        for g, r in sel["groups"].items():
            t = r["threshold"]
            t = f"{t:.6g}" if isinstance(t, float) and math.isfinite(t) else str(t)
            lines.append(f"threshold {side} [{g}]: {t}  (k={r['k']} of {r['n']}, "
                         f"selected {r['selected']}, density {r['density']:.6f})")
    extra = (s.get("prepass") or {}).get("retained_histograms_bytes")
    if extra is not None:
        lines.append(f"retention before selection: the pre-pass streams the scores once more "
                     f"({_gib(extra)}) to histogram the retained scores (the score "
                     "directories' histograms are of all scores)")
    if s.get("parameters"):
        lines.append("parameters: " + json.dumps(s["parameters"], sort_keys=True))
    return "\n".join(lines)


def check_writable_file(path: str, what: str, made_by_merge: str | None = None) -> None:
    """Refuse (ConfigError) a file path that cannot be written, without creating it: an
    existing directory, a missing or non-directory parent, no write permission. A parent
    inside `made_by_merge` (the output directory) need not exist yet."""
    import os
    from pathlib import Path

    from ..errors import ConfigError

    p = Path(path)
    parent = p.absolute().parent
    if not str(path).strip() or p.is_dir():
        raise ConfigError(f"{what} {path!r}: not a file path")
    out = Path(made_by_merge).absolute() if made_by_merge else None
    if out is not None and (parent == out or out in parent.parents):
        return
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: the directory {parent} does not exist")
    if (p.exists() and not os.access(p, os.W_OK)) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: not writable")


def run(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..io.atomic import write_atomic
    from ..merge import merge
    from ..merge.stages import StageClock

    if args.stats:  # before the merge, not after an hour of it
        check_writable_file(args.stats, "--stats", args.out_dir)
    res = merge(args.config, args.out_dir, backend=args.backend, device=args.device,
                max_memory=args.max_memory, resume=args.resume, overwrite=args.overwrite,
                dry_run=args.dry_run, progress=args.progress)
    if args.dry_run:
        print(format_plan(res.plan))
    else:
        print(f"wrote {res.out_dir} ({res.bytes_written / 1e9:.3f} GB) in {res.seconds:.1f} s, "
              f"reading {res.bytes_read / max(res.seconds, 1e-9) / 1e9:.2f} GB/s")
        print(f"stages: {StageClock.line_of(res.stages)}")
    if args.stats:
        doc = {"seconds": round(res.seconds, 3), "bytes_read": res.bytes_read,
               "prepass_bytes_read": res.prepass_bytes_read,
               "bytes_written": res.bytes_written, "stages": res.stages,
               "plan": res.plan.as_dict()}
        try:
            write_atomic(Path(args.stats), (json.dumps(doc, indent=1, default=str) + "\n").encode())
        except OSError as e:
            raise ConfigError(f"--stats {args.stats}: cannot write ({e.strerror or e}); the "
                              f"merge itself finished: {res.out_dir}") from None
    return 0
