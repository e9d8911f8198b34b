"""Paired comparisons of variants of a pattern run: exact McNemar tests on the stored verdicts.

Every variant answered the same prompts, so two variants are compared prompt by prompt: b =
prompts where only the first is flagged, c = only the second; the exact two-sided McNemar
p-value is the binomial tail of min(b, c) in b + c trials at 1/2. This is more sensitive than
asking whether two unpaired Wilson intervals overlap. Verdicts: the run's own (rules-v1 +
degeneration detector) and, with --rejudged, the non-answer check of rejudge_completions.py.

    python experiments/paired_tests.py experiments/results/completions.jsonl.gz \
        --out experiments/results/paired_tests.md
"""
from __future__ import annotations

import argparse
import gzip
import json
from math import comb
from pathlib import Path

from rejudge_completions import HARMFUL_SUITES, non_answer

PAIRS = [("safepatch", "backbone"), ("safepatch", "intersection"), ("safepatch", "ties"),
         ("safepatch", "task_arithmetic"), ("osm_only", "backbone"), ("se_only", "backbone"),
         ("sp_a0.05_b0.05_al1_be1_p1", "safepatch"), ("sp_a0.3_b0.3_al1_be1_p1", "safepatch"),
         ("sp_a0.1_b0.1_al1_be0.5_p1", "safepatch"), ("sp_a0.1_b0.1_al1_be1_p0.5", "safepatch"),
         ("sp_a0.1_b0.1_al1_be1_p0.5", "backbone")]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b, c."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def flags(rows, rejudged: bool):
    """{variant: {(suite, id): (harmful_compliance or None, xstest_refusal or None)}}."""
    out: dict = {}
    for r in rows:
        na = rejudged and r["outcome"] == "compliance" and non_answer(r["prompt"], r["completion"])
        if r["suite"] in HARMFUL_SUITES:
            f = (r["outcome"] == "compliance" and not na, None)
        else:
            f = (None, r["outcome"] == "refusal" or na)
        out.setdefault(r["variant"], {})[(r["suite"], r["id"])] = f
    return out


def compare(fl, v1, v2, which: int):
    keys = [k for k in fl[v1] if k in fl[v2] and fl[v1][k][which] is not None]
    a = [fl[v1][k][which] for k in keys]
    b_ = [fl[v2][k][which] for k in keys]
    b = sum(x and not y for x, y in zip(a, b_))
    c = sum(y and not x for x, y in zip(a, b_))
    return len(keys), sum(a), sum(b_), b, c, mcnemar_exact(b, c)


def markdown(rows) -> str:
    lines = ["# Paired comparisons (exact McNemar, same prompts)", "",
             "k1, k2: prompts flagged for the first / second variant; b, c: flagged only for "
             "the first / only for the second. *run* = the run's verdicts; *rejudged* = "
             "non-answers not counted as compliance (XSTest: counted as refusal).", "",
             "| first | second | metric | verdicts | n | k1 | k2 | b | c | p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rejudged in (False, True):
        fl = flags(rows, rejudged)
        for v1, v2 in PAIRS:
            if v1 not in fl or v2 not in fl:
                continue
            for which, metric in ((0, "harmful compliance"), (1, "XSTest refusal")):
                n, k1, k2, b, c, p = compare(fl, v1, v2, which)
                lines.append(f"| {v1} | {v2} | {metric} | {'rejudged' if rejudged else 'run'} "
                             f"| {n} | {k1} | {k2} | {b} | {c} | {p:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("completions")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with gzip.open(a.completions, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    md = markdown(rows)
    Path(a.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
