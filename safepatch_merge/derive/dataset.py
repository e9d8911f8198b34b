"""Harmful (prompt, response) pairs: loading, a split by prompt, chat rendering, a collator.

Pipeline: `load_pairs` (JSONL / JSON / CSV file, or a Hugging Face `datasets` name when that
library is installed) -> `split_by_prompt` (no prompt in both parts) -> `render_pairs` (the
backbone's chat template; token ids plus where the response starts and, on request, which
tokens carry the user's question) -> `PairCollator` (right-padded batches whose labels cover
the response tokens, the question tokens, or the whole rendered prompt only).
"""
from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from ..errors import DataError
from ..io.hashing import file_sha256

IGNORE_INDEX = -100
TARGETS = ("response", "question", "prompt")
# Two stand-in questions whose first and last characters differ, so the common prefix and
# suffix of their renderings are exactly the template text around the question.
_PROBES = ("alpha probe question", "omega probe request!")


@dataclass(frozen=True)
class Pair:
    """One harmful example: a user prompt and the response the patches train on."""

    prompt: str
    response: str


@dataclass(frozen=True)
class RenderedExample:
    """Token ids of prompt+response in the chat template; ids[:prompt_len] are the prompt.

    question_span: (start, end) token indices of the user's question inside the prompt (see
    `question_token_span`), or None when it was not located.
    """

    input_ids: tuple
    prompt_len: int
    prompt: str
    question_span: tuple | None = None


def _read_rows(path: Path) -> list:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            return rows
        if suffix == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]}: one list-valued key
                lists = [v for v in obj.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: expected a JSON list of objects (or an object "
                                    "with exactly one list of them)")
                obj = lists[0]
            if not isinstance(obj, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            return obj
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .csv")


def _read_hf_dataset(name: str, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data file not found: {name} (and the `datasets` library, needed for "
                        "Hugging Face dataset names, is not installed)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; report one line either way
        raise DataError(f"cannot load Hugging Face dataset {name!r} split {split!r}: "
                        f"{' '.join(str(e).split())[:200]}") from e
    return [dict(r) for r in ds]


def load_pairs(source: str | Path, prompt_field: str = "prompt", response_field: str = "response",
               hf_split: str = "train", limit: int | None = None, input_field: str | None = None,
               require_response: bool = True,
               field_hint: str = "set --prompt-field/--response-field") -> list[Pair]:
    """Read (prompt, response) pairs from a JSONL / JSON / CSV file or a HF dataset name.

    prompt_field / response_field: the column names. Rows whose prompt or response is empty
    are an error (not silently dropped); so are a missing field and an empty file.
    input_field: an optional column appended to the prompt after a newline when non-empty
    (Alpaca's `input`, as Alpaca-style data is trained); absent or empty values are skipped.
    require_response: False reads prompts only (the response field may be absent; Pair's
    response is then "").
    field_hint: what a missing-field error tells the user to do.
    limit: keep the first `limit` rows (after validation). Returns a list of Pair.
    """
    p = Path(source)
    if p.is_file():
        rows, where = _read_rows(p), str(p)
    elif p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".ndjson") or p.exists():
        raise DataError(f"data file not found: {p}")
    else:
        rows, where = _read_hf_dataset(str(source), hf_split), f"dataset {source}"
    if not rows:
        raise DataError(f"{where}: no examples")
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {i + 1} is not an object")
        for field in (prompt_field, response_field) if require_response else (prompt_field,):
            if field not in row:
                have = ", ".join(sorted(map(str, row))) or "none"
                raise DataError(f"{where}: row {i + 1} has no field {field!r} (fields: {have}); "
                                f"{field_hint}")
        prompt, response = row[prompt_field], row.get(response_field, "")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: row {i + 1} has an empty or non-text {prompt_field!r}")
        if require_response and (not isinstance(response, str) or not response.strip()):
            raise DataError(f"{where}: row {i + 1} has an empty or non-text {response_field!r}")
        extra = row.get(input_field) if input_field else None
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n{extra}"
        pairs.append(Pair(prompt, response if isinstance(response, str) else ""))
    return pairs[:limit] if limit is not None else pairs


def split_by_prompt(pairs: list[Pair], heldout_fraction: float, seed: int = 0
                    ) -> tuple[list[Pair], list[Pair]]:
    """(train, heldout): distinct prompts are shuffled with `seed` and ⌈fraction·#prompts⌉ of
    them (at least one when fraction > 0, never all) go to heldout with all their responses,
    so no prompt is in both parts. Order within each part follows the input."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    prompts = sorted({p.prompt for p in pairs})
    if heldout_fraction == 0.0:
        return list(pairs), []
    if len(prompts) < 2:
        raise DataError("a held-out split needs at least 2 distinct prompts; set --heldout 0")
    random.Random(seed).shuffle(prompts)
    # ceil in exact rationals from the decimal the user wrote: 0.07·100 -> 7, not 8
    n_held = min(max(1, math.ceil(Fraction(repr(heldout_fraction)) * len(prompts))),
                 len(prompts) - 1)
    held = set(prompts[:n_held])
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


def _messages(question: str, system_prompt: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}]


def question_char_span(tokenizer, question: str, system_prompt: str | None = None
                       ) -> tuple[str, int, int]:
    """(rendered prompt text, start, end): where the question's characters sit in the chat
    template's rendering of the user turn (with the generation prompt).

    The template is rendered with two stand-in questions; their common prefix and suffix are
    the template text before and after the question (system prompt — the template's default
    one included —, role and turn markers, generation prompt). Raises DataError when the
    template alters the question text (e.g. strips or escapes it), since its tokens cannot
    then be told apart.
    """
    def render(q: str) -> str:
        return tokenizer.apply_chat_template(_messages(q, system_prompt), tokenize=False,
                                             add_generation_prompt=True)

    a, b = render(_PROBES[0]), render(_PROBES[1])
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
        suf += 1
    text = render(question)
    end = len(text) - suf
    if not (text[:pre] == a[:pre] and text[end:] == a[len(a) - suf:] and text[pre:end] == question):
        raise DataError("the chat template changes the question text, so the question's tokens "
                        "cannot be located; use loss response_nll or prompt_nll")
    return text, pre, end


def question_token_span(tokenizer, question: str, system_prompt: str | None = None
                        ) -> tuple[list[int], int, int]:
    """(prompt token ids, start, end): the tokens ids[start:end] are the question's — every
    token of the rendered prompt that carries at least one character of the question text.

    Excluded: the system turn (also a default one the template inserts), the role and
    turn markers (`<|im_start|>user\n`, `<|im_end|>\n`) and the generation prompt. A token
    that straddles the question's first or last character (possible with tokenizers whose
    merges cross a newline) is included. Needs a fast tokenizer (character offsets).
    """
    text, c0, c1 = question_char_span(tokenizer, question, system_prompt)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("locating the question's tokens needs a fast tokenizer (offsets)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hit = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < c1 and e > c0]
    if not hit:
        raise DataError(f"no token of the rendered prompt covers the question {question[:40]!r}")
    return list(enc["input_ids"]), hit[0], hit[-1] + 1


def render_pairs(pairs: list[Pair], tokenizer, max_length: int = 512,
                 system_prompt: str | None = None, locate_question: bool = False
                 ) -> tuple[list[RenderedExample], int]:
    """Render pairs through the tokenizer's chat template and tokenize them.

    The prompt part is the template applied to the user turn with add_generation_prompt=True;
    the response part is what the full conversation adds after it (response + end-of-turn),
    tokenized separately so the boundary is exact, and cut after its last eos token.
    max_length: tokens per example; the response is truncated to fit, and an example whose
    prompt leaves no room for one response token is dropped.
    locate_question: also set each example's question_span (`question_token_span`).
    Returns (examples, number dropped).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("tokenizer has no chat template; pass one with --chat-template FILE")
    if max_length < 2:
        raise DataError(f"max length must be at least 2 tokens, got {max_length}")
    eos = tokenizer.eos_token_id
    out, dropped = [], 0
    for pair in pairs:
        msgs = _messages(pair.prompt, system_prompt)
        prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": pair.response}], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError("the chat template does not render the prompt as a prefix of the "
                            "conversation, so response tokens cannot be located")
        p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        if eos is not None and eos in r_ids:
            r_ids = r_ids[: len(r_ids) - r_ids[::-1].index(eos)]
        room = max_length - len(p_ids)
        if room < 1 or not r_ids:
            dropped += 1
            continue
        span = None
        if locate_question:
            q_ids, q0, q1 = question_token_span(tokenizer, pair.prompt, system_prompt)
            if q_ids != list(p_ids):
                raise DataError("the tokenizer splits the rendered prompt differently with "
                                "offsets; question tokens cannot be located")
            span = (q0, q1)
        out.append(RenderedExample(tuple(p_ids) + tuple(r_ids[:room]), len(p_ids), pair.prompt,
                                   span))
    return out, dropped


class PairCollator:
    """Right-pads RenderedExamples into a batch: input_ids, attention_mask, labels (int64, (B, T)).

    target 'response': labels are the response tokens (prompt and padding = -100);
    'question': the user question's own tokens only (RenderedExample.question_span; render
    with locate_question=True); 'prompt': the whole rendered prompt (system turn, role
    markers, question, generation prompt). Labels are unshifted (label t is token t; the loss
    predicts it from position t-1), like Hugging Face's. The first token of a sequence has no
    prediction, so the loss never covers it.
    """

    def __init__(self, pad_token_id: int, target: str = "response"):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.pad_token_id = int(pad_token_id)
        self.target = target

    def __call__(self, examples: list[RenderedExample]) -> dict:
        T = max(len(e.input_ids) for e in examples)
        B = len(examples)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            row = torch.tensor(e.input_ids, dtype=torch.long)
            ids[i, :n] = row
            att[i, :n] = 1
            if self.target == "response":
                labels[i, e.prompt_len:n] = row[e.prompt_len:]
            elif self.target == "question":
                if e.question_span is None:
                    raise ValueError("example has no question_span; render with "
                                     "locate_question=True")
                q0, q1 = e.question_span
                labels[i, q0:q1] = row[q0:q1]
            else:
                labels[i, :e.prompt_len] = row[:e.prompt_len]
        return {"input_ids": ids, "attention_mask": att, "labels": labels}


def data_identity(source: str | Path) -> dict:
    """{"path", "sha256"} of a data file (sha256 None for a dataset name)."""
    p = Path(source)
    if p.is_file():
        return {"path": str(p.resolve()), "sha256": file_sha256(p)}
    return {"path": str(source), "sha256": None}
