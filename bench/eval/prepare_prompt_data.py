"""Build safepatch_merge/data/prompts/*.jsonl from the public data folder's eval/ (run once;
output committed).

Only MIT / CC BY / Apache-2.0 prompt sets are packaged (see safepatch_merge/data/DATA_LICENSES.md).
Each output line: {"id", "prompt", "harmful": bool, ...source metadata}. HarmBench copyright
behaviours are dropped (they ask for copyrighted text, and the suite excludes them anyway).

    python bench/eval/prepare_prompt_data.py --data-dir DATA
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "safepatch_merge" / "data" / "prompts"


def _write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{name}: {len(rows)} prompts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="the public data folder (with eval/xstest_prompts.csv, ...)")
    ev = ap.parse_args().data_dir / "eval"

    rows = list(csv.DictReader(open(ev / "xstest_prompts.csv", encoding="utf-8")))
    _write("xstest", [{"id": f"xstest-{r['id']}", "prompt": r["prompt"],
                       "harmful": r["label"] == "unsafe", "type": r["type"], "label": r["label"]}
                      for r in rows])

    rows = list(csv.DictReader(open(ev / "harmbench_test.csv", encoding="utf-8")))
    out = []
    for r in rows:
        if r["FunctionalCategory"] == "copyright":
            continue
        rec = {"id": f"harmbench-{r['BehaviorID']}", "prompt": r["Behavior"], "harmful": True,
               "functional_category": r["FunctionalCategory"],
               "semantic_category": r["SemanticCategory"]}
        if r["ContextString"].strip():
            rec["context"] = r["ContextString"]
        out.append(rec)
    _write("harmbench", out)

    rows = list(csv.DictReader(open(ev / "strongreject.csv", encoding="utf-8")))
    _write("strongreject", [{"id": f"strongreject-{i}", "prompt": r["forbidden_prompt"],
                             "harmful": True, "category": r["category"], "source": r["source"]}
                            for i, r in enumerate(rows)])

    rows = list(csv.DictReader(open(ev / "advbench.csv", encoding="utf-8")))
    _write("advbench", [{"id": f"advbench-{i}", "prompt": r["goal"], "harmful": True}
                        for i, r in enumerate(rows)])

    out = []
    for line in open(ev / "mt_bench_questions.jsonl", encoding="utf-8"):
        q = json.loads(line)
        # First turn only: single-turn generation; the second turn needs the model's own answer.
        out.append({"id": f"mtbench-{q['question_id']}", "prompt": q["turns"][0], "harmful": False,
                    "category": q["category"]})
    _write("mtbench", out)


if __name__ == "__main__":
    main()
