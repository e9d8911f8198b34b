"""SweepConfig: a grid over top rates, scales and retention and how to evaluate its points,
declared once; `safepatch sweep`'s options are derived from it (config_fields.py). Torch-free,
so `safepatch sweep --help` stays fast."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..config_fields import option
from ..errors import ConfigError

_INPUTS = "inputs (either --from-run or the explicit paths)"
_GRID = "grid (each a list; the product is swept)"
_EVAL, _MERGE = "evaluation", "merge"
SWEEP_GROUPS = (_INPUTS, _GRID, _EVAL, _MERGE)  # `safepatch sweep --help`, in this order


@dataclass(frozen=True)
class SweepConfig:
    """A grid and how to evaluate it, declared once for `safepatch sweep` (config_fields.py).
    Lists are the grid axes (their product is swept).

    backbone / patch_* / scores_*: model, patched model and score directories (as `safepatch
    run` writes them; `from_run` fills them in). dedup_against: training files whose prompts
    are dropped from the eval suites. keep_models: keep every merged model (disk: one model
    per point) instead of deleting it after its evaluation.
    """

    backbone: str = option(group=_INPUTS)
    patch_se: str | None = option(group=_INPUTS)
    patch_osm: str | None = option(group=_INPUTS)
    scores_se: str | None = option(group=_INPUTS)
    scores_osm: str | None = option(group=_INPUTS)
    top_rate_se: list[float] = option([0.05, 0.1, 0.2], group=_GRID)
    top_rate_osm: list[float] = option([0.05, 0.1, 0.2], group=_GRID)
    alpha: list[float] = option([1.0], group=_GRID)
    beta: list[float] = option([1.0], group=_GRID)
    retention: list[float] = option([1.0], group=_GRID)
    mask_mode: str = option("difference", group=_GRID,
                            choices=("difference", "intersection", "topk", "none"))
    granularity: str = option("global", group=_GRID, choices=("global", "layer", "tensor"))
    seed: int = option(0, group=_GRID, help="retention draw seed")
    suites: list[str] = option(["xstest", "harmbench"], group=_EVAL, append=True,
                               flag="--suite", help="repeat; default {default}")
    limit: int | None = option(16, group=_EVAL, help="prompts per suite (default {default})")
    subset_seed: int = option(0, cli=False)
    max_new_tokens: int = option(32, group=_EVAL)
    batch_size: int = option(8, group=_EVAL)
    utility_limit: int | None = option(16, group=_EVAL)
    utility: bool = option(True, group=_EVAL, flag="--no-utility")
    utility_max_tokens: int = option(64, cli=False)
    dedup_against: list[str] = option(
        [], group=_EVAL, append=True, metavar="TRAIN_FILE",
        help="drop eval prompts found in this file (default with --from-run: the run's data "
             "files)")
    eval_backbone: bool = option(True, group=_EVAL, flag="--no-backbone",
                                 help="do not evaluate the backbone")
    device: str = option("auto", group=_EVAL, help="eval device")
    dtype: str = option("auto", cli=False)
    merge_device: str = option("cpu", group=_MERGE)
    backend: str | None = option(None, group=_MERGE,
                                 choices=("auto", "reference", "cpp", "triton"))
    max_memory: str | None = option(None, group=_MERGE)
    output_dtype: str = option("auto", group=_MERGE,
                               choices=("auto", "float32", "bfloat16", "float16"))
    keep_models: bool = option(False, group=_MERGE)

    def grid(self) -> list[dict]:
        """Every point of the grid, in axis order (top_rate_se slowest)."""
        axes = {"top_rate_se": self.top_rate_se, "top_rate_osm": self.top_rate_osm,
                "alpha": self.alpha, "beta": self.beta, "retention": self.retention}
        for k, v in axes.items():
            if not isinstance(v, (list, tuple)) or not v:
                raise ConfigError(f"sweep axis {k}: expected a non-empty list, got {v!r}")
            for x in v:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                    raise ConfigError(f"sweep axis {k}: expected numbers, got {x!r}")
        for k in ("top_rate_se", "top_rate_osm", "retention"):
            if any(not 0 <= x <= 1 for x in axes[k]):
                raise ConfigError(f"sweep axis {k}: values must be in [0, 1]")
        return [dict(zip(axes, (float(x) for x in combo)))
                for combo in itertools.product(*axes.values())]
