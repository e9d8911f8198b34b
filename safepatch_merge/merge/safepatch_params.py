"""The SafePatching method section of a merge config, parsed once into an immutable object.

Section (docs/merge_config.md)::

    patches:   {se: PATH, osm: PATH, format: full|delta, nonfinite: error|skip}
    scores:    {se: PATH, osm: PATH}
    parameters: {top_rate_se, top_rate_osm, alpha, beta, retention, retention_order, rescale,
                 mask_mode, granularity, seed}

Either patch may be left out (SE-only / OSM-only ablations); scores are needed for every given
patch unless mask_mode is ``none``. Defaults: merge/defaults.py. Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

from ..config_fields import check_keys
from ..errors import ConfigError
from . import defaults
from .config_values import get_bool, get_choice, get_float, get_str

SIDES = ("se", "osm")
PATCH_KEYS = ("se", "osm", "format", "nonfinite")
SCORE_KEYS = ("se", "osm")
PARAM_KEYS = ("top_rate_se", "top_rate_osm", "alpha", "beta", "retention", "retention_order",
              "rescale", "mask_mode", "granularity", "seed")


@dataclass(frozen=True)
class SafepatchParams:
    """patches / scores: {side: source as written in the config} for the sides that have a
    patch (scores: also only where the mask mode uses them; empty for ``none``). top_rate:
    {side: a or b}, fractions in [0, 1]. retention: p in [0, 1]. Everything else as named in
    the config's ``parameters``."""

    config_keys: ClassVar[tuple[str, ...]] = ("patches", "scores", "parameters")

    patches: Mapping[str, str]
    scores: Mapping[str, str]
    patch_format: str
    nonfinite: str
    top_rate: Mapping[str, float]
    alpha: float
    beta: float
    retention: float
    rescale: bool
    mask_mode: str
    granularity: str
    retention_order: str
    seed: int

    @property
    def deltas(self) -> bool:
        """True when the patches are task vectors rather than patched checkpoints."""
        return self.patch_format == "delta"

    @classmethod
    def parse(cls, section: Mapping[str, Any]) -> "SafepatchParams":
        """Validate `section` ({key: raw YAML value} for the keys in ``config_keys``); raise
        ConfigError naming the first bad key."""
        pa = check_keys(section.get("patches"), PATCH_KEYS, "patches")
        sc = check_keys(section.get("scores"), SCORE_KEYS, "scores")
        pr = check_keys(section.get("parameters"), PARAM_KEYS, "parameters")
        if not pa.get("se") and not pa.get("osm"):
            raise ConfigError("patches: give at least one of patches.se and patches.osm")
        fmt = get_choice(pa, "format", defaults.PATCH_FORMAT, defaults.PATCH_FORMATS, "patches")
        nonfinite = get_choice(pa, "nonfinite", defaults.NONFINITE_PATCH,
                               defaults.NONFINITE_CHOICES, "patches")
        for side in SIDES:
            get_str(pa, side, "patches", required=False)
            get_str(sc, side, "scores", required=False)
        rate = {"se": get_float(pr, "top_rate_se", defaults.TOP_RATE_SE, "parameters", 0.0, 1.0),
                "osm": get_float(pr, "top_rate_osm", defaults.TOP_RATE_OSM, "parameters", 0.0,
                                 1.0)}
        alpha = get_float(pr, "alpha", defaults.ALPHA, "parameters")
        beta = get_float(pr, "beta", defaults.BETA, "parameters")
        p = get_float(pr, "retention", defaults.RETENTION, "parameters", 0.0, 1.0)
        rescale = get_bool(pr, "rescale", defaults.RESCALE, "parameters")
        if rescale and p == 0:
            raise ConfigError("parameters.rescale: needs retention > 0 (it divides by retention)")
        mode = get_choice(pr, "mask_mode", defaults.MASK_MODE, defaults.MASK_MODES, "parameters")
        granularity = get_choice(pr, "granularity", defaults.GRANULARITY, defaults.GRANULARITIES,
                                 "parameters")
        order = get_choice(pr, "retention_order", defaults.RETENTION_ORDER,
                           defaults.RETENTION_ORDERS, "parameters")
        seed = pr.get("seed", defaults.SEED)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ConfigError(f"parameters.seed: expected a non-negative integer, got {seed!r}")
        if mode != "none":
            for side in SIDES:
                if pa.get(side) and not sc.get(side):
                    raise ConfigError(f"scores.{side}: required for patches.{side} with "
                                      f"mask_mode {mode!r} (or use mask_mode: none)")
        patches = {s: pa[s] for s in SIDES if pa.get(s)}
        scores = ({s: sc[s] for s in SIDES if sc.get(s) and s in patches}
                  if mode != "none" else {})
        return cls(MappingProxyType(patches), MappingProxyType(scores), fmt, nonfinite,
                   MappingProxyType(rate), alpha, beta, p, rescale, mode, granularity, order,
                   int(seed))
