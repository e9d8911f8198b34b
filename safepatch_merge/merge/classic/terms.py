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
    factor (fp32 value), its Philox patch id (its index among the non-base models), and for
    a magnitude trim the element index from which entries tied at the threshold are dropped
    (:mod:`.trim`); zero deltas are never kept."""

    weight: float
    keep: str = KEEP_ALL
    threshold: float = 0.0      # KEEP_TRIM: keep |d| > threshold, and == threshold before
    density: float = 1.0        # KEEP_RANDOM: keep with probability density
    factor: float = 1.0
    patch_id: int = 0
    cutoff: int | None = None   # KEEP_TRIM: tensor index where kept ties stop (None: never)
