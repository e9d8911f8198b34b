"""The derive objectives' static facts: which patch each makes, which way its NLL guard points
and what extra inputs it needs. Torch-free, so the derive configuration and `--help` can name
and check them; the losses themselves are in objectives.py."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """Static facts about one objective. ascent: the D_h NLL rises as it trains (guarded by
    an NLL ceiling); otherwise it falls (guarded by a floor)."""

    name: str
    patch: str
    ascent: bool
    needs_reference: bool = False
    needs_retain: bool = False
    title: str = ""


OBJECTIVES = {
    "ga": Objective("ga", "safety_enhancement", True, title="gradient ascent (SE patch)"),
    "npo": Objective("npo", "safety_enhancement", True, needs_reference=True,
                     title="NPO (SE patch)"),
    "graddiff": Objective("graddiff", "safety_enhancement", True, needs_retain=True,
                          title="gradient difference (SE patch)"),
    "refusal_sft": Objective("refusal_sft", "safety_enhancement", False,
                             title="refusal SFT (SE patch)"),
    "gd": Objective("gd", "over_safety_mitigation", False, title="gradient descent (OSM patch)"),
}
SE_OBJECTIVES = tuple(k for k, v in OBJECTIVES.items() if v.patch == "safety_enhancement")
