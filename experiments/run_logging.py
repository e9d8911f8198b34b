"""Logging of the experiment drivers: one format, to RUN_LOG and stdout, and the log copied
beside the results when a driver ends."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path


def setup_logging(path: Path) -> None:
    """INFO and above of every logger to `path` (appended; its folder is created) and to
    stdout, timestamped; HTTP and lock-file chatter only from WARNING."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in (logging.FileHandler(path, encoding="utf-8"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        root.addHandler(h)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def copy_log(path: Path, results: Path) -> None:
    """Flush every handler and copy the log `path` into the folder `results` (created), so
    the committed results carry the run's log."""
    for h in logging.getLogger().handlers:
        h.flush()
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, results / path.name)
