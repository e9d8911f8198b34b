"""Shared set-up of the derive/score tests: a tiny backbone and a small harmful-pair file."""
from __future__ import annotations

import json
from pathlib import Path

# Short synthetic pairs (no harmful text needed to test the mechanics): 6 prompts, 12 pairs,
# responses of unequal length so per-example normalisation matters.
PAIRS = [
    {"prompt": f"question {i % 6}: how do I do thing {i % 6}?",
     "response": ("step " * (2 + (i * 5) % 11)) + f"done {i}."}
    for i in range(12)
]


def write_pairs(path: Path, pairs=PAIRS) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def tiny_setup(root: Path, tie: bool = False, seed: int = 0):
    """(backbone_dir, data_file) under `root`."""
    from safepatch_merge.testing import make_tiny_model_dir

    bb = make_tiny_model_dir(root / ("bb_tied" if tie else "bb"), seed=seed, tie_word_embeddings=tie)
    return bb, write_pairs(root / "pairs.jsonl")
