"""Re-judge the stored completions of pattern runs with the current judge and rewrite their
tables.

For each results directory (holding completions.jsonl.gz, results.json): judge every stored
completion (the raw completions file is read, never changed) with the packaged judge (v2 by
default), write the verdicts to verdicts.jsonl.gz (variant, suite, id, outcome,
refusal_kind, evidence, score, judge), recompute each finished variant's rates from them
(the run's own rates move to metrics.as_run), and rewrite results.json, table.md and
pattern.png. The calibration candidates' completions were not exported, so their rates stay
as run (the table says which judge made them).

    python experiments/rejudge_results.py experiments/results experiments/results/run2 \
        experiments/results/cpu_run1
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pattern_report import write_report  # noqa: E402

from safepatch_merge.eval.judge_models import load_judge  # noqa: E402

RATE_KEYS = ("harmbench", "strongreject", "harmful_pooled", "xstest")


def read_completions(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def judge_rows(rows: list[dict], judge) -> list[dict]:
    """One verdict dict per stored completion (same order)."""
    verdicts = judge.judge_batch([r["prompt"] for r in rows], [r["completion"] for r in rows],
                                 [r["harmful"] for r in rows])
    ident = f"{judge.name} {judge.version}"
    return [{"variant": r["variant"], "suite": r["suite"], "id": r["id"], **v.as_dict(),
             "judge": ident} for r, v in zip(rows, verdicts)]


def variant_metrics(rows: list[dict], verdicts: list[dict]) -> dict[str, dict]:
    """{variant: {harmbench, strongreject, harmful_pooled, xstest: rates}} from the verdicts
    (reproduce_pattern._rates over the stored suites)."""
    from reproduce_pattern import _rates

    by: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r, v in zip(rows, verdicts):
        by[r["variant"]][r["suite"]].append({"outcome": v["outcome"],
                                             "refusal_kind": v["refusal_kind"]})
    out = {}
    for name, s in by.items():
        out[name] = {"harmbench": _rates(s["harmbench_test"]),
                     "strongreject": _rates(s["strongreject"]),
                     "harmful_pooled": _rates(s["harmbench_test"] + s["strongreject"]),
                     "xstest": _rates(s["xstest_safe"])}
    return out


def rejudge_dir(d: Path, judge) -> dict:
    """Re-judge one results directory (module doc); returns {variant: metrics}."""
    rows = read_completions(d / "completions.jsonl.gz")
    verdicts = judge_rows(rows, judge)
    tmp = d / "verdicts.jsonl.gz.partial"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for v in verdicts:
            f.write(json.dumps(v, ensure_ascii=False) + "\n")
    tmp.replace(d / "verdicts.jsonl.gz")
    record = json.loads((d / "results.json").read_text(encoding="utf-8"))
    new = variant_metrics(rows, verdicts)
    ident = f"{judge.name} {judge.version}"
    for name, v in record["variants"].items():
        if v.get("status") != "done" or name not in new:
            continue
        m = v["metrics"]
        if "as_run" not in m:  # keep the run's own rates once, whatever re-judging follows
            m["as_run"] = {"judge": m.get("judge") or "rules-v1",
                           **{k: m[k] for k in RATE_KEYS}}
        m.update(new[name])
        m["judge"] = ident
    record["rejudged"] = ("variants re-judged from completions.jsonl.gz by "
                          "experiments/rejudge_results.py; verdicts in verdicts.jsonl.gz")
    write_report(record, d)
    return new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="results directories of pattern runs")
    ap.add_argument("--judge", default="v2", help="packaged judge: v2 (default) or rules-v1")
    a = ap.parse_args(argv)
    judge = load_judge(a.judge)
    for d in map(Path, a.dirs):
        new = rejudge_dir(d, judge)
        print(f"{d}: {len(new)} variants re-judged by {judge.name} {judge.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
