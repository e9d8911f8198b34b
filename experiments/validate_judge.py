"""Figures of the refusal judges against human labels (docs/judge.md reports them).

Development (always): the v2 judge out of fold on the development data (the shared SmolLM2
file's development part, the blind SmolLM2 labels of experiments/judge_labels and the
development part of the other chat models' blind labels there; five folds grouped by prompt,
seed 0), with and without the prompt's kind given; rules-v1 on the same rows.
Held out (only when asked): the SmolLM2 lockbox (--lockbox), the XSTest completion files
(--xstest), the held-out blind SmolLM2 labels (--heldout-labels) and the lockbox part of the
other chat models' blind labels (--other-models-lockbox), judged by the shipped, frozen v2
weights and by rules-v1.

    python experiments/validate_judge.py --data-dir DATA \
        --out experiments/results/judge_v2/validation [--lockbox] [--xstest] [--heldout-labels]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from safepatch_merge.eval.judge import RulesV1Judge
from safepatch_merge.eval.judge_split import DEVELOPMENT, LOCKBOX
from safepatch_merge.eval.judge_v2 import JudgeV2
from safepatch_merge.eval.judge_validation import (SMOLLM2_FILE, XSTEST_FILES, figures,
                                                   judge_outcomes, markdown,
                                                   out_of_fold_outcomes, read_extra,
                                                   read_other_models, read_smollm2,
                                                   read_xstest)

HERE = Path(__file__).resolve().parent
EXTRA = HERE / "judge_labels" / "smollm2_extra_labelled.jsonl"
HELDOUT = HERE / "judge_labels" / "smollm2_heldout_labelled.jsonl"
OTHER_MODELS = HERE / "judge_labels" / "other_models_labelled.jsonl"


def _no_models(f: dict) -> dict:
    f.pop("per_model")
    return f


def _machine() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    import os
    return f"{name}, {os.cpu_count()} CPUs"


def development(data_dir: Path) -> dict[str, dict]:
    """{source: figures} of the development rows (see module doc)."""
    dev = read_smollm2(data_dir / "judge" / SMOLLM2_FILE, DEVELOPMENT)
    extra = read_extra(EXTRA)
    other = read_other_models(OTHER_MODELS, DEVELOPMENT, data_dir)
    rows = dev + extra + other
    oof = out_of_fold_outcomes(rows)
    out = {}
    n, m = len(dev), len(dev) + len(extra)
    out["SmolLM2 development, v2 out of fold"] = figures(dev, oof[:n])
    # per model only where the models are the shared file's (the blind labels spread 33
    # variants over 210 rows); the other models' rows per source
    out["blind labels (development), v2 out of fold"] = _no_models(figures(extra, oof[n:m]))
    out["other models (development), v2 out of fold"] = figures(other, oof[m:])
    out["SmolLM2 development, v2 out of fold, prompt kind not given"] = figures(
        dev, out_of_fold_outcomes(rows, harmful_known=False)[:n])
    v1 = RulesV1Judge()
    out["SmolLM2 development, rules-v1"] = figures(dev, judge_outcomes(v1, dev))
    out["blind labels (development), rules-v1"] = _no_models(figures(extra,
                                                                     judge_outcomes(v1, extra)))
    out["other models (development), rules-v1"] = figures(other, judge_outcomes(v1, other))
    return out


def held_out(data_dir: Path, lockbox: bool, xstest: bool, heldout_labels: bool = False,
             other_models_lockbox: bool = False) -> dict[str, dict]:
    out = {}
    v2, v1 = JudgeV2(), RulesV1Judge()
    sources = []
    if lockbox:
        sources.append(("SmolLM2 lockbox", read_smollm2(data_dir / "judge" / SMOLLM2_FILE,
                                                        LOCKBOX)))
    if xstest:
        sources += [(f, read_xstest(data_dir / "judge" / f)) for f in XSTEST_FILES]
    if heldout_labels:
        sources.append(("held-out blind labels", read_extra(HELDOUT, "smollm2-heldout")))
    if other_models_lockbox:
        sources.append(("other models lockbox", read_other_models(OTHER_MODELS, LOCKBOX,
                                                                  data_dir)))
    for name, rows in sources:
        out[f"{name}, v2"] = figures(rows, judge_outcomes(v2, rows))
        out[f"{name}, v2, prompt kind not given"] = figures(
            rows, judge_outcomes(v2, rows, harmful_known=False))
        out[f"{name}, rules-v1"] = figures(rows, judge_outcomes(v1, rows))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the shared data folder")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    ap.add_argument("--lockbox", action="store_true", help="also judge the SmolLM2 lockbox")
    ap.add_argument("--xstest", action="store_true", help="also judge the XSTest files")
    ap.add_argument("--heldout-labels", action="store_true",
                    help="also judge the held-out blind labels (experiments/judge_labels)")
    ap.add_argument("--other-models-lockbox", action="store_true",
                    help="also judge the lockbox part of the other chat models' blind labels")
    a = ap.parse_args(argv)
    data_dir = Path(a.data_dir)
    t0 = time.time()
    res = development(data_dir)
    res |= held_out(data_dir, a.lockbox, a.xstest, a.heldout_labels, a.other_models_lockbox)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    meta = {"command": "python experiments/validate_judge.py --data-dir DATA --out STEM" +
                       (" --lockbox" if a.lockbox else "") + (" --xstest" if a.xstest else "") +
                       (" --heldout-labels" if a.heldout_labels else "") +
                       (" --other-models-lockbox" if a.other_models_lockbox else ""),
            "commit": commit, "judge_version": JudgeV2().version,
            "date": time.strftime("%Y-%m-%d"), "machine": _machine(),
            "python": platform.python_version(),
            "seconds": round(time.time() - t0, 1)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "figures": res}, indent=1)
                                        + "\n", encoding="utf-8")
    head = (f"# Refusal judge validation\n\n- command: `{meta['command']}`\n- commit "
            f"{commit[:12]}, judge v2 {meta['judge_version']}, {meta['date']}, "
            f"{meta['machine']}, Python {meta['python']}\n\n")
    out.with_suffix(".md").write_text(head + markdown(res), encoding="utf-8")
    print(head + markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
