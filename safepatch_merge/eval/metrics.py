"""Rates with their sample size and a 95% Wilson score interval."""
from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Rate:
    """k successes out of n, as a proportion with a Wilson score interval [low, high]
    (n = 0 gives NaN everywhere: nothing was measured)."""
    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "rate": _nan_none(self.value),
                "ci95": [_nan_none(self.low), _nan_none(self.high)]}

    def fmt(self, digits: int = 1) -> str:
        """'12.0% [8.1, 17.4] (n=150)' for tables."""
        if not self.n:
            return "n/a (n=0)"
        return (f"{100 * self.value:.{digits}f}% [{100 * self.low:.{digits}f}, "
                f"{100 * self.high:.{digits}f}] (n={self.n})")


def _nan_none(x: float):
    return None if x != x else x


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927):
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). Returns (nan, nan) for n = 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp rounding: the exact interval always contains 0 when k = 0 and 1 when k = n.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def rate(flags) -> Rate:
    """A Rate from an iterable of booleans (True = counted)."""
    flags = list(flags)
    k, n = sum(bool(f) for f in flags), len(flags)
    return Rate(k, n, *wilson_interval(k, n))
