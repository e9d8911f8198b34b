"""Versions of the libraries that shape numerical results, for provenance records."""
from __future__ import annotations

import importlib
import platform
from typing import Iterable

from . import __version__

# What a merge depends on besides torch; derive and score add the training stack.
MERGE_LIBRARIES = ("safetensors",)
TRAINING_LIBRARIES = ("transformers", "peft", "accelerate", "safetensors")


def versions(libraries: Iterable[str] = MERGE_LIBRARIES) -> dict[str, str]:
    """{"python", "torch", "safepatch_merge", then each of `libraries` that imports: its
    __version__} (strings, in that order)."""
    import torch  # the caller has loaded it already; importing it here keeps this module light

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "safepatch_merge": __version__}
    for name in libraries:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out
