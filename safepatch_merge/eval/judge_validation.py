"""Validating a refusal judge against human labels, and fitting the v2 judge's learned part.

Sources (docs/judge.md says which role each plays):

- the labelled SmolLM2 completions (JSONL: suite, backbone, variant, prompt, completion, label
  in full_compliance / full_refusal / partial_refusal / non_answer), split by prompt hash
  (judge_split) into a development part and a lockbox;
- blind labels of further SmolLM2 completions (same labels, plus `harmful`);
- the XSTest v2 completion files (CSV: type, prompt, completion, final_label in
  1_full_compliance / 2_full_refusal / 3_partial_refusal) — evaluation only.

Figures per source: binary (refusal vs not, with outcome.counts_as_refusal on both the gold
label and the verdict) and three-way (refusal / compliance / non-answer + degenerate)
accuracy, precision, recall and confusion matrices; per model, refusal recall and false
refusals. Accuracies carry 95% Wilson intervals.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .judge_features import FEATURES, SIGNS, features
from .judge_fit import DEFAULT_FOLDS, DEFAULT_SEED, LinearModel, fit, group_kfold
from .judge_split import DEVELOPMENT, LOCKBOX, prompt_hash, row_id, split_of
from .metrics import rate
from .outcome import counts_as_refusal, three_way

# The learned part's penalty (judge_fit.fit), chosen on the out-of-fold binary accuracy of
# the shared file's development part among 0.01, 0.003, 0.001, 0.0003 (0.908, 0.922, 0.931,
# 0.931): the largest penalty of the best.
V2_L2 = 0.001
SMOLLM2_FILE = "smollm2_completions_labelled.jsonl"
XSTEST_FILES = ("xstest_v2_completions_gpt4.csv", "xstest_v2_completions_llama2orig.csv")
_GOLD = {"full_compliance": ("compliance", None), "full_refusal": ("refusal", "full"),
         "partial_refusal": ("refusal", "partial"), "non_answer": ("non_answer", None),
         "1_full_compliance": ("compliance", None), "2_full_refusal": ("refusal", "full"),
         "3_partial_refusal": ("refusal", "partial")}


@dataclass(frozen=True)
class LabelledRow:
    """One human-labelled completion. label: compliance / refusal / non_answer; kind:
    full / partial for refusals; model: backbone/variant where known; group: prompt hash."""
    source: str
    prompt: str
    completion: str
    label: str
    kind: str | None
    harmful: bool
    model: str
    variant: str
    rid: str
    group: str


def _row(source, prompt, completion, label, harmful, model="", variant="") -> LabelledRow:
    if label not in _GOLD:
        raise DataError(f"{source}: unknown label {label!r}")
    gold, kind = _GOLD[label]
    return LabelledRow(source, prompt, completion, gold, kind, bool(harmful), model, variant,
                       row_id(prompt, completion), prompt_hash(prompt))


def read_smollm2(path: str | Path, part: str) -> list[LabelledRow]:
    """Rows of the labelled SmolLM2 file in `part` (judge_split.DEVELOPMENT or LOCKBOX); the
    other part's rows are dropped on their prompt alone."""
    if part not in (DEVELOPMENT, LOCKBOX):
        raise ValueError(f"part must be {DEVELOPMENT!r} or {LOCKBOX!r}")
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            r = json.loads(line)
            if split_of(r["prompt"]) != part:
                continue
            rows.append(_row(f"smollm2-{part}", r["prompt"], r["completion"], r["label"],
                             r["suite"] != "xstest_safe", r["backbone"], r["variant"]))
    return rows


def read_extra(path: str | Path, source: str = "smollm2-extra") -> list[LabelledRow]:
    """Blind-labelled completions of experiments/judge_labels (the development labels, or the
    held-out set with source 'smollm2-heldout')."""
    with open(path, encoding="utf-8") as f:
        return [_row(source, r["prompt"], r["completion"], r["label"], r["harmful"],
                     r["run"], r["variant"]) for r in map(json.loads, f)]


# The data-folder files the other models' texts come from (the label file holds only a row
# index into them: their licences keep the texts in the data folder).
OTHER_MODEL_SOURCES = {
    "safety_refusals": ("train/safety_refusals.json", "instruction", "output"),
    "harmful_pairs": ("train/harmful_pairs.jsonl", "prompt", "response"),
    "benign_reference": ("eval/benign_reference_completions.jsonl", "prompt", "response"),
    "alpaca_demo": ("train/alpaca_en_demo.json", "instruction", "output"),
}


def other_model_text(data_dir: str | Path, source: str, ref: int) -> tuple[str, str]:
    """(prompt, completion) of row `ref` of an OTHER_MODEL_SOURCES file; an Alpaca-style
    `input` is appended to the instruction after a blank line."""
    rel, pk, ck = OTHER_MODEL_SOURCES[source]
    rows = _source_rows(str(Path(data_dir) / rel))
    if not 0 <= ref < len(rows):
        raise DataError(f"{rel}: no row {ref}")
    r = rows[ref]
    return r[pk] + (("\n\n" + r["input"]) if r.get("input") else ""), r[ck]


@lru_cache(maxsize=None)
def _source_rows(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f]
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_other_models(path: str | Path, part: str, data_dir: str | Path) -> list[LabelledRow]:
    """Blind-labelled texts of other chat models (experiments/judge_labels/
    other_models_labelled.jsonl) in `part` of the prompt-hash split; model = the text's source
    (safety_refusals, harmful_pairs, benign_reference, alpaca_demo, frontier_alpaca). Rows
    with a `ref` take their text from that row of the data folder's source file."""
    if part not in (DEVELOPMENT, LOCKBOX):
        raise ValueError(f"part must be {DEVELOPMENT!r} or {LOCKBOX!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for r in map(json.loads, f):
            if r["part"] != part:
                continue
            prompt, completion = (other_model_text(data_dir, r["source"], r["ref"])
                                  if "ref" in r else (r["prompt"], r["completion"]))
            if split_of(prompt) != part:
                raise DataError(f"{path}: item {r['item']} is not in the {part} part")
            out.append(_row(f"other-models-{part}", prompt, completion, r["label"],
                            r["harmful"], r["source"]))
    return out


def read_xstest(path: str | Path) -> list[LabelledRow]:
    """An XSTest v2 completion file; `contrast_*` types are the unsafe prompts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"prompt", "completion", "final_label", "type"} <= set(rows[0]):
        raise DataError(f"{path}: expected columns type, prompt, completion, final_label")
    return [_row(path.name, r["prompt"], r["completion"], r["final_label"],
                 r["type"].startswith("contrast"), path.stem.rsplit("_", 1)[-1])
            for r in rows]


# --------------------------------------------------------------------------- fitting

def design(rows: Sequence[LabelledRow]) -> tuple[np.ndarray, list[bool]]:
    """(feature matrix (n, len(FEATURES)) float64, explicit-refusal flag per row)."""
    xs, explicit = [], []
    for r in rows:
        v, ev = features(r.prompt, r.completion, r.harmful)
        xs.append(v)
        explicit.append(bool(ev["explicit"]))
    return np.asarray(xs, dtype=np.float64), explicit


def fit_v2(rows: Sequence[LabelledRow], l2: float = V2_L2) -> LinearModel:
    """The learned part, fitted on the rows the explicit-refusal rules leave open (the rules
    decide the others, so those rows would only teach it what the rules already say)."""
    x, explicit = design(rows)
    keep = [i for i, e in enumerate(explicit) if not e]
    return fit(x[keep], [rows[i].label for i in keep], FEATURES, l2, signs=SIGNS)


def out_of_fold_outcomes(rows: Sequence[LabelledRow], n_folds: int = DEFAULT_FOLDS,
                         seed: int = DEFAULT_SEED, l2: float = V2_L2,
                         harmful_known: bool = True) -> list[str]:
    """The v2 judge's outcome for each row, its learned part fitted on the other folds
    (judge_fit.group_kfold: grouped by prompt, seeded). harmful_known=False judges without
    telling the judge the prompt's kind (the fit still sees it)."""
    from .judge_v2 import JudgeV2

    folds = group_kfold([r.group for r in rows], n_folds, seed)
    out: list[str] = [""] * len(rows)
    for f in range(n_folds):
        test = [i for i, k in enumerate(folds) if k == f]
        if not test:
            continue
        judge = JudgeV2(model=fit_v2([r for r, k in zip(rows, folds) if k != f], l2))
        verdicts = judge.judge_batch([rows[i].prompt for i in test],
                                     [rows[i].completion for i in test],
                                     [rows[i].harmful if harmful_known else None for i in test])
        for i, v in zip(test, verdicts):
            out[i] = v.outcome
    return out


def judge_outcomes(judge, rows: Sequence[LabelledRow], harmful_known: bool = True
                   ) -> list[str]:
    """Outcomes of any Judge on the rows (harmful_known=False: the prompt's kind withheld)."""
    return [v.outcome for v in judge.judge_batch(
        [r.prompt for r in rows], [r.completion for r in rows],
        [r.harmful if harmful_known else None for r in rows])]


# --------------------------------------------------------------------------- figures

def _prf(gold: list[str], pred: list[str], cls: str) -> dict:
    tp = sum(g == cls and p == cls for g, p in zip(gold, pred))
    n_pred, n_gold = pred.count(cls), gold.count(cls)
    return {"precision": tp / n_pred if n_pred else None,
            "recall": tp / n_gold if n_gold else None, "n_gold": n_gold, "n_pred": n_pred}


def figures(rows: Sequence[LabelledRow], outcomes: Sequence[str]) -> dict:
    """Binary and three-way figures (module doc) and per-model recall / false refusals."""
    if len(rows) != len(outcomes):
        raise ValueError(f"{len(rows)} rows for {len(outcomes)} outcomes")
    gb = [counts_as_refusal(r.label, r.harmful) for r in rows]
    pb = [counts_as_refusal(o, r.harmful) for r, o in zip(rows, outcomes)]
    tp = sum(g and p for g, p in zip(gb, pb))
    fp = sum(p and not g for g, p in zip(gb, pb))
    fn = sum(g and not p for g, p in zip(gb, pb))
    tn = len(rows) - tp - fp - fn
    binary = {"n": len(rows), "accuracy": rate(g == p for g, p in zip(gb, pb)).as_dict(),
              "precision": tp / (tp + fp) if tp + fp else None,
              "recall": tp / (tp + fn) if tp + fn else None,
              "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}
    g3 = [three_way(r.label) for r in rows]
    p3 = [three_way(o) for o in outcomes]
    classes = ("refusal", "compliance", "other")
    three = {"n": len(rows), "accuracy": rate(g == p for g, p in zip(g3, p3)).as_dict(),
             "per_class": {c: _prf(g3, p3, c) for c in classes},
             "confusion": {"rows_gold_cols_judged": list(classes),
                           "matrix": [[sum(g == a and p == b for g, p in zip(g3, p3))
                                       for b in classes] for a in classes]}}
    def model_of(r: LabelledRow) -> str:
        return "/".join(p for p in (r.model, r.variant) if p)

    per_model = {}
    for key in dict.fromkeys(model_of(r) for r in rows):
        idx = [i for i, r in enumerate(rows) if model_of(r) == key]
        ref = [i for i in idx if rows[i].label == "refusal"]
        comp = [i for i in idx if rows[i].label == "compliance"]
        per_model[key] = {
            "n": len(idx),
            "refusal_recall": rate(pb[i] for i in ref).as_dict(),
            "false_refusals": sum(pb[i] for i in comp), "n_compliance": len(comp)}
    return {"binary": binary, "three_way": three, "per_model": per_model}


def _pct(d) -> str:
    if d is None:
        return "–"
    if isinstance(d, dict):
        lo, hi = d["ci95"]
        return f"{d['rate']:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{d:.3f}"


def markdown(results: dict[str, dict]) -> str:
    """Tables of {source: figures(...)}: binary, three-way, confusion, per model."""
    lines = ["| source | n | binary accuracy [95% CI] | precision | recall | TP | FP | FN | TN |"
             " three-way accuracy [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for src, f in results.items():
        b, t = f["binary"], f["three_way"]
        c = b["confusion"]
        lines.append(f"| {src} | {b['n']} | {_pct(b['accuracy'])} | {_pct(b['precision'])} | "
                     f"{_pct(b['recall'])} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} | "
                     f"{_pct(t['accuracy'])} |")
    lines += ["", "Three-way: per class precision / recall, and the confusion matrix (rows: "
                  "label; columns: judged refusal, compliance, other).", "",
              "| source | refusal P / R | compliance P / R | other P / R | confusion |",
              "|---|---|---|---|---|"]
    for src, f in results.items():
        pc = f["three_way"]["per_class"]
        cells = [f"{_pct(pc[c]['precision'])} / {_pct(pc[c]['recall'])}"
                 for c in ("refusal", "compliance", "other")]
        m = f["three_way"]["confusion"]["matrix"]
        lines.append(f"| {src} | " + " | ".join(cells) + " | " +
                     " · ".join("[" + ", ".join(str(v) for v in row) + "]" for row in m) + " |")
    lines += ["", "Per model: refusal recall (labelled refusals judged refusal under the "
                  "mapping) and false refusals (labelled compliance judged refusal).", "",
              "| source | model | n | refusal recall [95% CI] (n) | false refusals / compliant |",
              "|---|---|---|---|---|"]
    for src, f in results.items():
        for model, m in f.get("per_model", {}).items():
            r = m["refusal_recall"]
            lines.append(f"| {src} | {model} | {m['n']} | "
                         f"{_pct(r) if r['n'] else '–'} ({r['n']}) | "
                         f"{m['false_refusals']} / {m['n_compliance']} |")
    return "\n".join(lines) + "\n"
