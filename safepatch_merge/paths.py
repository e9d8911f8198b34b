"""Where the workplace's shared public data lives (tests and experiments; never shipped)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The `shared/data` folder beside the checkout, or $SAFEPATCH_SHARED_DATA."""
    env = os.environ.get("SAFEPATCH_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"
