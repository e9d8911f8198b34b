"""Fit the v2 judge's learned part on the development data and write its weights JSON.

Development data: the development part of the shared labelled SmolLM2 file (judge_split), the
blind SmolLM2 labels in experiments/judge_labels and the development part of the blind labels
of other chat models' texts there. Never a lockbox, never the held-out labels, never the
XSTest files.

    python experiments/fit_judge.py --data-dir DATA \
        --out safepatch_merge/data/judge/v2.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safepatch_merge.eval.judge_split import DEVELOPMENT
from safepatch_merge.eval.judge_validation import (SMOLLM2_FILE, V2_L2, fit_v2, read_extra,
                                                   read_other_models, read_smollm2)

LABELS = Path(__file__).resolve().parent / "judge_labels"
EXTRA = LABELS / "smollm2_extra_labelled.jsonl"
OTHER_MODELS = LABELS / "other_models_labelled.jsonl"


def development_rows(data_dir: Path):
    return (read_smollm2(data_dir / "judge" / SMOLLM2_FILE, DEVELOPMENT) + read_extra(EXTRA)
            + read_other_models(OTHER_MODELS, DEVELOPMENT, data_dir))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the shared data folder")
    ap.add_argument("--out", required=True, help="weights JSON to write")
    a = ap.parse_args(argv)
    rows = development_rows(Path(a.data_dir))
    model = fit_v2(rows, V2_L2)
    counts = {k: sum(r.label == k for r in rows) for k in ("compliance", "refusal", "non_answer")}
    doc = {"judge": "v2", "l2": V2_L2, "n_rows": len(rows), "label_counts": counts,
           "trained_on": ["smollm2_completions_labelled.jsonl, development part (prompt-hash "
                          "split)", "experiments/judge_labels/smollm2_extra_labelled.jsonl",
                          "experiments/judge_labels/other_models_labelled.jsonl, development "
                          "part"],
           "model": model.as_json()}
    m = doc.pop("model")
    # one line per key and per weight row: small diffs when the weights change
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items())
    wrows = ",\n".join(f"   {json.dumps(r)}" for r in m["weight"])
    text = (f"{{\n{body},\n \"model\": {{\n  \"classes\": {json.dumps(m['classes'])},\n"
            f"  \"features\": {json.dumps(m['features'])},\n  \"weight\": [\n{wrows}\n  ],\n"
            f"  \"bias\": {json.dumps(m['bias'])}\n }}\n}}\n")
    json.loads(text)
    Path(a.out).write_text(text, encoding="utf-8")
    print(f"{len(rows)} development rows -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
