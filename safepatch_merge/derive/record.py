"""Provenance helpers shared by derive and score: file hashes, checkpoint hashes, versions."""
from __future__ import annotations

import hashlib
import json
import os
import platform
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


def versions() -> dict:
    """Versions of the libraries that shape numerical results."""
    import torch

    import safepatch_merge

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "safepatch_merge": safepatch_merge.__version__}
    for mod in ("transformers", "peft", "accelerate", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


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
