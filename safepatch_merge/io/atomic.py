"""Whole-file writes that a kill or a full disk can interrupt without leaving a torn file.

``write_atomic`` writes a temporary file beside the target, fsyncs it and renames it over the
target: a reader sees the old file or the new one, never a prefix. The temporary file
(``NAME.tmp``; one a killed writer left is replaced) is created exclusively and without
following links, so a link planted at its name cannot redirect the write; on any failure it
is removed and the target is left as it was.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` (a str is written as UTF-8) by an fsynced temporary file and
    a rename, creating missing parent directories. OSError on failure, with `path` unchanged
    and no temporary file left."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        tmp.unlink()  # left by a killed writer
    except FileNotFoundError:
        pass
    fd = os.open(tmp, flags, 0o644)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
