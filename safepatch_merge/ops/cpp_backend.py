"""The csrc extension as a backend (filled in by the C++ ops work; unavailable until built)."""
from __future__ import annotations

import torch


def available(device: torch.device) -> bool:
    return False
