"""Paired comparisons of variants of a pattern run: exact McNemar tests on the verdicts.

Every variant answered the same prompts, so two variants are compared prompt by prompt: b =
prompts where only the first is flagged, c = only the second; the exact two-sided McNemar
p-value is the binomial tail of min(b, c) in b + c trials at 1/2. This is more sensitive than
asking whether two unpaired Wilson intervals overlap. Flags: harmful compliance (outcome
`compliance` on a HarmBench / StrongREJECT prompt) and XSTest over-refusal (refusal or
non-answer on an XSTest safe prompt). Verdicts: verdicts.jsonl.gz beside the completions
(experiments/rejudge_results.py, v2) and, with --as-run, also the run's own (stored in the
completions file; rules-v1 for the committed runs).

    python experiments/paired_tests.py experiments/results/completions.jsonl.gz \
        --out experiments/results/paired_tests.md --as-run
"""
from __future__ import annotations

import argparse
import gzip
import json
from math import comb
from pathlib import Path

HARMFUL_SUITES = ("harmbench_test", "strongreject")

PAIRS = [("safepatch", "backbone"), ("safepatch", "intersection"), ("safepatch", "ties"),
         ("safepatch", "task_arithmetic"), ("osm_only", "backbone"), ("se_only", "backbone"),
         ("sp_a0.05_b0.05_al1_be1_p1", "safepatch"), ("sp_a0.3_b0.3_al1_be1_p1", "safepatch"),
         ("sp_a0.1_b0.1_al1_be0.5_p1", "safepatch"), ("sp_a0.1_b0.1_al1_be1_p0.5", "safepatch"),
         ("sp_a0.1_b0.1_al1_be1_p0.5", "backbone"), ("sp_a0.1_b0.1_al2_be1_p1", "safepatch"),
         ("sp_a0.1_b0.3_al1_be1_p1", "safepatch"), ("sp_a0.05_b0.3_al1_be1_p1", "safepatch"),
         ("sp_a0.1_b0.1_al0.5_be1_p1", "safepatch"), ("sp_a0.1_b0.1_al1_be2_p1", "safepatch"),
         ("se_only", "safepatch"), ("ties", "backbone"), ("task_arithmetic", "backbone")]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b, c."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def flags(rows, outcomes):
    """{variant: {(suite, id): (harmful_compliance or None, xstest_over_refusal or None)}}
    from one outcome per row."""
    out: dict = {}
    for r, o in zip(rows, outcomes):
        if r["suite"] in HARMFUL_SUITES:
            f = (o == "compliance", None)
        else:
            f = (None, o in ("refusal", "non_answer"))
        out.setdefault(r["variant"], {})[(r["suite"], r["id"])] = f
    return out


def compare(fl, v1, v2, which: int):
    keys = [k for k in fl[v1] if k in fl[v2] and fl[v1][k][which] is not None]
    a = [fl[v1][k][which] for k in keys]
    b_ = [fl[v2][k][which] for k in keys]
    b = sum(x and not y for x, y in zip(a, b_))
    c = sum(y and not x for x, y in zip(a, b_))
    return len(keys), sum(a), sum(b_), b, c, mcnemar_exact(b, c)


def markdown(rows, verdict_sets: dict[str, list[str]]) -> str:
    """verdict_sets: {name: one outcome per row} (e.g. the v2 verdicts, the run's own)."""
    lines = ["# Paired comparisons (exact McNemar, same prompts)", "",
             "k1, k2: prompts flagged for the first / second variant; b, c: flagged only for "
             "the first / only for the second. Harmful compliance = outcome `compliance`; "
             "XSTest over-refusal = refusal or non-answer. Verdicts: "
             + "; ".join(f"*{k}*" for k in verdict_sets) + ".", "",
             "| first | second | metric | verdicts | n | k1 | k2 | b | c | p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, outcomes in verdict_sets.items():
        fl = flags(rows, outcomes)
        for v1, v2 in PAIRS:
            if v1 not in fl or v2 not in fl:
                continue
            for which, metric in ((0, "harmful compliance"), (1, "XSTest over-refusal")):
                n, k1, k2, b, c, p = compare(fl, v1, v2, which)
                lines.append(f"| {v1} | {v2} | {metric} | {name} | {n} | {k1} | {k2} | {b} | "
                             f"{c} | {p:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("completions", help="completions.jsonl.gz (verdicts.jsonl.gz beside it)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--as-run", action="store_true",
                    help="also test on the run's own verdicts (stored in the completions file)")
    a = ap.parse_args(argv)
    with gzip.open(a.completions, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with gzip.open(Path(a.completions).with_name("verdicts.jsonl.gz"), "rt",
                   encoding="utf-8") as f:
        verdicts = [json.loads(line) for line in f]
    if [(v["variant"], v["suite"], v["id"]) for v in verdicts] != \
            [(r["variant"], r["suite"], r["id"]) for r in rows]:
        raise SystemExit(f"{a.completions}: verdicts.jsonl.gz does not match its rows; "
                         "run experiments/rejudge_results.py again")
    judge = verdicts[0].get("judge") if verdicts else None
    sets = {judge or "current judge": [v["outcome"] for v in verdicts]}
    if a.as_run:
        sets["as run (rules-v1)"] = [r["outcome"] for r in rows]
    md = markdown(rows, sets)
    Path(a.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
