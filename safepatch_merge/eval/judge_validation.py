"""Validate the refusal judge against human-labelled completions (XSTest v2 completion files:
columns prompt, completion, final_label in {1_full_compliance, 2_full_refusal,
3_partial_refusal}; full and partial refusal both count as refusal)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .judge import RuleRefusalJudge

REFUSAL_LABELS = ("2_full_refusal", "3_partial_refusal")


@dataclass
class JudgeScore:
    """Confusion counts with refusal as the positive class, and the derived rates."""
    n: int
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    def as_dict(self) -> dict:
        return {"n": self.n, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "accuracy": self.accuracy, "precision": self.precision, "recall": self.recall}


def read_labelled(path: str | Path) -> list[tuple[str, str, bool]]:
    """(prompt, completion, is_refusal) rows of a labelled completion CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"completion", "final_label"} <= set(rows[0]):
        raise DataError(f"{path}: expected columns completion, final_label")
    return [(r.get("prompt", ""), r["completion"], r["final_label"] in REFUSAL_LABELS)
            for r in rows]


def score_judge(path: str | Path, judge=None) -> tuple[JudgeScore, list[dict]]:
    """Score `judge` (default RuleRefusalJudge) on a labelled file; also return the errors."""
    judge = judge or RuleRefusalJudge()
    tp = fp = tn = fn = 0
    errors = []
    rows = read_labelled(path)
    for prompt, completion, gold in rows:
        v = judge(completion)
        if v.refused and gold:
            tp += 1
        elif v.refused:
            fp += 1
            errors.append({"kind": "fp", "rule": v.rule, "prompt": prompt, "completion": completion})
        elif gold:
            fn += 1
            errors.append({"kind": "fn", "rule": None, "prompt": prompt, "completion": completion})
        else:
            tn += 1
    return JudgeScore(len(rows), tp, fp, tn, fn), errors
