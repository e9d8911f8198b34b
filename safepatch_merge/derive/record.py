"""Provenance helpers shared by derive and score: checkpoint hashes, timestamps, JSON records
(library versions: safepatch_merge.versions)."""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from ..io.hashing import file_sha256


def weights_sha256(model_dir: str | Path) -> str:
    """Hex sha256 identifying a checkpoint's weights: sha256 over the lines
    "<file name> <sha256 of file>\\n" of its *.safetensors files (and index json) in name order."""
    d = Path(model_dir)
    files = sorted(list(d.glob("*.safetensors")) + list(d.glob("*.safetensors.index.json")))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name} {file_sha256(f)}\n".encode())
    return h.hexdigest()


def now_iso() -> str:
    """Current UTC time, ISO 8601, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON (indented, sorted keys off) and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
