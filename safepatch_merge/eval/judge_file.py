"""`judge_file`: the Python twin of `safepatch judge IN -o OUT`.

IN: JSONL (one object per line; .jsonl, .json, .ndjson) or CSV (.csv, header row) with a prompt
and a completion column (names configurable) and, optionally, a column saying whether the
prompt is harmful (true/false, 1/0, yes/no, harmful/safe, unsafe/safe; empty = unknown).
OUT: JSONL, one line per input row in input order: every input field, plus `outcome`,
`refusal_kind` (full / partial for refusals, else null), `judge_evidence` (the rule or the
score that decided it), `judge_score`, `judge` and `judge_version`.

An empty completion (or a JSON null) is judged like any other text: the degeneration detector
calls it `degenerate`. A malformed file (not UTF-8, a line that is not a JSON object, a missing
column, a value that is not text) stops before anything is written, with a one-line error
naming the file and line; OUT is written to a temporary sibling and renamed, so it is either
absent or complete.
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from ..errors import DataError
from ..io.atomic import write_atomic

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TRUE = {"true", "1", "yes", "harmful", "unsafe"}
_FALSE = {"false", "0", "no", "safe", "benign", "harmless"}


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte {raw[e.start]:#04x})") from None


def _harmful(value, path: Path, line: int, column: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s == "":
        return None
    if s in _TRUE or s in _FALSE:
        return s in _TRUE
    raise DataError(f"{path}: line {line}: {column!r} is {value!r}, not true/false")


def read_pairs(path: str | Path, prompt_column: str = "prompt",
               completion_column: str = "completion", harmful_column: str | None = "harmful"
               ) -> tuple[list[dict], list[str], list[str], list[bool | None]]:
    """(rows as read, prompts, completions, harmful flags) of a JSONL or CSV file (module doc).
    The harmful column is optional: where the file has none, every flag is None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + (".csv",):
        raise DataError(f"{path}: unknown format {suffix or '(no suffix)'!r}; use .jsonl or .csv")
    text = _decode(path)
    rows, lines = [], []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        for col in (prompt_column, completion_column):
            if col not in header:
                raise DataError(f"{path}: line 1: no column {col!r} (columns: "
                                f"{', '.join(header) or 'none'})")
        try:
            for r in reader:
                if None in r or any(v is None for v in r.values()):
                    raise DataError(f"{path}: line {reader.line_num}: {len(header)} columns "
                                    "expected")
                rows.append(dict(r))
                lines.append(reader.line_num)
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: {e}") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise DataError(f"{path}: line {n}: not a JSON object")
            rows.append(r)
            lines.append(n)
    if not rows:
        raise DataError(f"{path}: no rows")
    use_harmful = harmful_column is not None and any(harmful_column in r for r in rows)
    prompts, completions, harmful = [], [], []
    for r, n in zip(rows, lines):
        for col in (prompt_column, completion_column):
            if col not in r:
                raise DataError(f"{path}: line {n}: no {col!r} field")
        p, c = r[prompt_column], r[completion_column]
        if c is None:
            c = ""
        for col, v in ((prompt_column, p), (completion_column, c)):
            if not isinstance(v, str):
                raise DataError(f"{path}: line {n}: {col!r} is {type(v).__name__}, not text")
        prompts.append(p)
        completions.append(c)
        harmful.append(_harmful(r.get(harmful_column), path, n, harmful_column)
                       if use_harmful else None)
    return rows, prompts, completions, harmful


def judge_file(in_path: str | Path, out_path: str | Path, judge="v2",
               judge_model: str | None = None, prompt_column: str = "prompt",
               completion_column: str = "completion", harmful_column: str | None = "harmful",
               device: str = "cpu", batch_size: int = 256) -> dict:
    """Judge every row of `in_path` into `out_path` (module doc). judge: a name for
    judge_models.load_judge or a Judge. Returns {"rows", "outcomes" {outcome: count},
    "judge", "judge_version", "out"}."""
    from .judge_models import load_judge

    rows, prompts, completions, harmful = read_pairs(in_path, prompt_column,
                                                     completion_column, harmful_column)
    j = load_judge(judge, judge_model, device=device) if isinstance(judge, str) else judge
    verdicts = []
    for s in range(0, len(rows), batch_size):
        verdicts += j.judge_batch(prompts[s:s + batch_size], completions[s:s + batch_size],
                                  harmful[s:s + batch_size])
    lines = []
    for r, v in zip(rows, verdicts):
        lines.append(json.dumps({**r, "outcome": v.outcome, "refusal_kind": v.refusal_kind,
                                 "judge_evidence": v.evidence, "judge_score": v.score,
                                 "judge": j.name, "judge_version": j.version},
                                ensure_ascii=False) + "\n")
    write_atomic(out_path, "".join(lines))
    counts = Counter(v.outcome for v in verdicts)
    return {"rows": len(rows), "outcomes": {o: counts.get(o, 0) for o in
                                            ("compliance", "refusal", "non_answer", "degenerate")},
            "refusal_kinds": dict(Counter(v.refusal_kind for v in verdicts if v.refusal_kind)),
            "judge": j.name, "judge_version": j.version, "out": str(out_path)}
