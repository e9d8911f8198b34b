"""Evaluation prompt suites: the packaged sets, user files, fixed subsets, and deduplication
against training prompts.

A suite is a list of `Prompt`s. Packaged suites (see safepatch_merge/data/DATA_LICENSES.md):

- `xstest`: 250 safe prompts (refusing them is over-refusal) + 200 unsafe contrast prompts.
- `harmbench`: HarmBench test standard behaviours; `harmbench-contextual` adds the contextual
  ones with their context prepended (HarmBench's own layout: context, "---", behaviour);
  copyright behaviours are never included.
- `strongreject`, `advbench`: harmful prompts.
- `mtbench`: first turns of the 80 MT-Bench questions (benign).

A user file (JSONL, JSON list or CSV) works wherever a suite name does; see `load_user_file`.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError, DataError
from .config import DEFAULT_FUZZY_THRESHOLD

PACKAGED = {
    "xstest": "xstest.jsonl",
    "harmbench": "harmbench.jsonl",
    "harmbench-contextual": "harmbench.jsonl",
    "strongreject": "strongreject.jsonl",
    "advbench": "advbench.jsonl",
    "mtbench": "mtbench.jsonl",
}
# Field names tried, in order, for the prompt text of a user or training file.
PROMPT_FIELDS = ("prompt", "instruction", "goal", "Goal", "Behavior", "behavior",
                 "forbidden_prompt", "question", "text")


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt. `harmful` says which metrics it enters (compliance on harmful
    prompts, over-refusal on benign ones); `meta` keeps the source's fields (type, category)."""
    suite: str
    id: str
    text: str
    harmful: bool
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class DedupReport:
    """How many prompts of one suite a training file removed, by which rule."""
    suite: str
    before: int
    removed_exact: int
    removed_fuzzy: int
    fuzzy_threshold: float
    removed_ids: list[str] = field(default_factory=list)

    @property
    def after(self) -> int:
        return self.before - self.removed_exact - self.removed_fuzzy


def _read_jsonl(path: Path | None, text: str | None = None) -> list[dict]:
    lines = (text if text is not None else path.read_text(encoding="utf-8")).splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
    return out


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSONL, JSON (list of objects, or {"data": [...]}) or CSV file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: expected a JSON list of objects")
            return data
        return _read_jsonl(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _prompt_field(rows: list[dict], path) -> str:
    for name in PROMPT_FIELDS:
        if name in rows[0]:
            return name
    raise DataError(f"{path}: no prompt field (looked for {', '.join(PROMPT_FIELDS)}); "
                    f"found {', '.join(map(str, rows[0]))}")


def _as_bool_label(value, path, i) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "unsafe", "harmful"):
        return True
    if s in ("0", "false", "no", "safe", "benign", "harmless"):
        return False
    raise DataError(f"{path}: row {i}: cannot read harmful/label value {value!r}")


def load_user_file(path: str | Path, harmful: bool | None = True, name: str | None = None
                   ) -> list[Prompt]:
    """Prompts from a user file. Text comes from the first present field of PROMPT_FIELDS;
    a per-row `harmful` (bool) or `label` ("safe"/"unsafe", "benign"/"harmful") field wins over
    the `harmful` argument (None = the file must say). `id` is kept when present."""
    path = Path(path)
    rows = read_records(path)
    if not rows:
        raise DataError(f"{path}: no prompts")
    name = name or path.stem
    key = _prompt_field(rows, path)
    out = []
    for i, r in enumerate(rows):
        text = r.get(key)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {i}: empty or missing '{key}'")
        if "harmful" in r:
            h = _as_bool_label(r["harmful"], path, i)
        elif "label" in r:
            h = _as_bool_label(r["label"], path, i)
        elif harmful is None:
            raise DataError(f"{path}: row {i}: no 'harmful' or 'label' field")
        else:
            h = harmful
        meta = {k: v for k, v in r.items() if k not in (key, "id", "harmful")
                and isinstance(v, (str, int, float, bool))}
        out.append(Prompt(name, str(r.get("id", f"{name}-{i}")), text, h, meta))
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate ids")
    return out


def _packaged_rows(filename: str) -> list[dict]:
    res = resources.files("safepatch_merge") / "data" / "prompts" / filename
    try:
        text = res.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"packaged prompt file {filename} is missing from the installation"
                        ) from None
    return _read_jsonl(Path(filename), text)


def harmbench_prompt(behavior: str, context: str | None) -> str:
    """HarmBench's layout for contextual behaviours: the context, a rule, then the request."""
    return f"{context}\n\n---\n\n{behavior}" if context else behavior


def load_suite(name_or_path: str, user_harmful: bool | None = True) -> list[Prompt]:
    """A packaged suite by name (see module doc), or a user file when given a path.

    `harmbench` = standard behaviours only; `harmbench-contextual` = standard + contextual
    (context prepended). Unknown names that are not files raise ConfigError."""
    if name_or_path in PACKAGED:
        rows = _packaged_rows(PACKAGED[name_or_path])
        out = []
        for r in rows:
            meta = {k: v for k, v in r.items() if k not in ("id", "prompt", "harmful", "context")}
            text = r["prompt"]
            if name_or_path.startswith("harmbench"):
                if r.get("functional_category") == "copyright":
                    continue
                if r.get("functional_category") == "contextual":
                    if name_or_path != "harmbench-contextual":
                        continue
                    text = harmbench_prompt(text, r.get("context"))
                    meta["behavior"] = r["prompt"]
            out.append(Prompt(name_or_path, r["id"], text, bool(r["harmful"]), meta))
        return out
    p = Path(name_or_path)
    if p.suffix.lower() in (".jsonl", ".json", ".csv") or p.exists():
        return load_user_file(p, harmful=user_harmful)
    raise ConfigError(f"unknown suite '{name_or_path}' (packaged: {', '.join(PACKAGED)}; "
                      "or give a .jsonl/.json/.csv file)")


def fixed_subset(prompts: list[Prompt], limit: int | None, seed: int = 0) -> list[Prompt]:
    """A fixed subset of at most `limit` prompts: ordered by SHA-256 of (seed, suite, id), so
    the same prompts are chosen whatever the file order. A suite with harmful and benign
    prompts (XSTest) keeps their proportions (largest-remainder rounding). Returned in the
    suite's original order."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")

    def rank(p: Prompt) -> str:
        return hashlib.sha256(f"{seed}\x00{p.suite}\x00{p.id}".encode()).hexdigest()

    groups = {h: [p for p in prompts if p.harmful == h] for h in (True, False)}
    groups = {h: g for h, g in groups.items() if g}
    exact = {h: limit * len(g) / len(prompts) for h, g in groups.items()}
    take = {h: int(x) for h, x in exact.items()}
    for h in sorted(exact, key=lambda h: (-(exact[h] - take[h]), not h))[:limit - sum(take.values())]:
        take[h] += 1
    keep = {p.id for h, g in groups.items() for p in sorted(g, key=rank)[:take[h]]}
    return [p for p in prompts if p.id in keep]


# ----------------------------------------------------------------------------- deduplication

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Text for exact matching: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = _PUNCT.sub(" ", t)
    return _WS.sub(" ", t).strip()


def load_training_prompts(path: str | Path) -> list[str]:
    """Prompt texts of a training file (JSONL/JSON/CSV with one of PROMPT_FIELDS; Alpaca-style
    rows with a non-empty `input` have it appended, as they were trained)."""
    rows = read_records(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    key = _prompt_field(rows, path)
    out = []
    for r in rows:
        t = r.get(key)
        if isinstance(t, str) and t.strip():
            extra = r.get("input")
            out.append(f"{t}\n{extra}" if isinstance(extra, str) and extra.strip() else t)
    return out


class TrainingIndex:
    """Normalised training prompts with a token inverted index, for exact and fuzzy lookup.

    Fuzzy match: difflib SequenceMatcher ratio >= threshold on the normalised texts. Only
    training prompts sharing at least a third of the query's distinct tokens are compared
    (an inverted index), so large training files stay fast; a pair below that overlap has a
    ratio well under any useful threshold anyway."""

    def __init__(self, texts: Iterable[str]):
        self.norm = sorted({normalise(t) for t in texts} - {""})
        self.exact = set(self.norm)
        self.postings: dict[str, list[int]] = {}
        for i, t in enumerate(self.norm):
            for tok in set(t.split()):
                self.postings.setdefault(tok, []).append(i)

    def match(self, text: str, threshold: float) -> str | None:
        """'exact', 'fuzzy' or None for one evaluation prompt."""
        n = normalise(text)
        if n in self.exact:
            return "exact"
        toks = set(n.split())
        if not toks:
            return None
        counts: dict[int, int] = {}
        for tok in toks:
            for i in self.postings.get(tok, ()):
                counts[i] = counts.get(i, 0) + 1
        need = max(1, len(toks) // 3)
        sm = difflib.SequenceMatcher(autojunk=False)
        sm.set_seq2(n)
        for i, c in counts.items():
            if c < need:
                continue
            sm.set_seq1(self.norm[i])
            if sm.real_quick_ratio() >= threshold and sm.quick_ratio() >= threshold \
                    and sm.ratio() >= threshold:
                return "fuzzy"
        return None


def deduplicate(prompts: list[Prompt], index: TrainingIndex,
                threshold: float = DEFAULT_FUZZY_THRESHOLD) -> tuple[list[Prompt], DedupReport]:
    """Drop prompts that occur in the training data (see TrainingIndex); for contextual
    HarmBench prompts the behaviour alone is matched. Returns (kept, report for this suite)."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"fuzzy threshold must be in (0, 1], got {threshold}")
    kept, ex, fz, removed = [], 0, 0, []
    for p in prompts:
        m = index.match(p.meta.get("behavior", p.text), threshold)
        if m is None:
            kept.append(p)
            continue
        removed.append(p.id)
        if m == "exact":
            ex += 1
        else:
            fz += 1
    suite = prompts[0].suite if prompts else ""
    return kept, DedupReport(suite, len(prompts), ex, fz, threshold, removed)
