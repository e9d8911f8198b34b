"""How one non-base model takes part in a classic merge of one tensor (shared by the eager
merge in combine.py and the fused kernels in fused.py)."""
from __future__ import annotations

from dataclasses import dataclass

KEEP_ALL = "all"
KEEP_NONE = "none"
KEEP_TRIM = "trim"
KEEP_RANDOM = "random"


@dataclass(frozen=True)
class Term:
    """One non-base model's part in a tensor: weight, how its delta is sparsified, the rescale
    factor (fp32 value), and its Philox patch id (its index among the non-base models)."""

    weight: float
    keep: str = KEEP_ALL
    threshold: float = 0.0      # KEEP_TRIM: keep |d| >= threshold and |d| > 0
    density: float = 1.0        # KEEP_RANDOM: keep with probability density
    factor: float = 1.0
    patch_id: int = 0
