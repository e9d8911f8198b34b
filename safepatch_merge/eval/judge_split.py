"""The development / lockbox split of a labelled completion file, by a hash of the prompt.

A row's part depends on its prompt alone (sha256 of the normalised prompt text), never on the
other rows, the model or the label: every completion of one prompt lands in the same part, so a
judge developed on one part has seen none of the other part's prompts, and any new prompt can
be placed without reading the lockbox. 60 % of prompt hashes go to development.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

DEVELOPMENT, LOCKBOX = "development", "lockbox"
DEVELOPMENT_PERCENT = 60


def normalise_prompt(prompt: str) -> str:
    """NFKC, lower case, whitespace runs collapsed to one space, ends stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", prompt)).strip().lower()


def prompt_hash(prompt: str) -> str:
    """sha256 hex digest (64 chars) of the normalised prompt."""
    return hashlib.sha256(normalise_prompt(prompt).encode("utf-8")).hexdigest()


def split_of(prompt: str) -> str:
    """DEVELOPMENT when the prompt hash's first 8 hex digits mod 100 fall below
    DEVELOPMENT_PERCENT, else LOCKBOX."""
    return DEVELOPMENT if int(prompt_hash(prompt)[:8], 16) % 100 < DEVELOPMENT_PERCENT \
        else LOCKBOX


def row_id(prompt: str, completion: str) -> str:
    """A stable 12-hex id of one labelled row: sha256 of prompt + NUL + completion (raw text),
    cut to 12 digits. Rules and docs cite development rows by it."""
    return hashlib.sha256(f"{prompt}\0{completion}".encode("utf-8")).hexdigest()[:12]
