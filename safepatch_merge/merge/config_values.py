"""Reading typed values out of parsed YAML mappings, each error naming its key.

Shared by every schema of the merge (common keys, the SafePatching and classic sections) and
by the pipeline's run config, so the unknown-key rule and the number, choice and size rules
read the same everywhere. Imports no torch.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ConfigError, clip

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_size(value: Any, key: str) -> int:
    """Bytes of a size like 5GB, 512MiB, 1e9 or 4096 (decimal units for kB/MB/GB, binary for
    KiB/MiB/GiB). Raises ConfigError naming `key`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 5GB or 512MiB, got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"{key}: expected a size like 5GB or 512MiB, got {clip(value)}")
        unit = (m.group(2) or "").lower().rstrip("b")
        base = 1024 if unit.endswith("i") else 1000
        power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
        n = float(m.group(1)) * base ** power
    if not math.isfinite(n) or n <= 0:
        raise ConfigError(f"{key}: size must be positive, got {clip(value)}")
    return int(n)


def get_float(d: dict, key: str, default: float, where: str, lo: float | None = None,
              hi: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}.{key}: expected a finite number, got {clip(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{where}.{key} = {v!r} is out of range [{lo}, {hi}]")
    return float(v)


def get_choice(d: dict, key: str, default: str, choices: tuple[str, ...], where: str) -> str:
    v = d.get(key, default)
    if v not in choices:
        raise ConfigError(f"{where}.{key}: expected one of {', '.join(choices)}, got {clip(v)}")
    return v


def get_bool(d: dict, key: str, default: bool, where: str) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {clip(v)}")
    return v


def get_str(d: dict, key: str, where: str, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}{'.' if where else ''}{key}: expected a path or Hub id, "
                          f"got {clip(v)}")
    return v
