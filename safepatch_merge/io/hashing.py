"""sha256 of whole files, for manifests, provenance and data records."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path


def file_sha256(path: str | Path, block: int = 1 << 22,
                stop: threading.Event | None = None) -> str | None:
    """Hex sha256 of the file's bytes, read in `block`-byte reads; None if `stop` was set
    before the end (checked between blocks)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            if stop is not None and stop.is_set():
                return None
            h.update(chunk)
    return h.hexdigest()
