"""The streaming merge: config schema, methods (SafePatching; classic merges plug in as
methods), exact thresholds, the engine, model card and provenance. Entry point: :func:`merge`."""
from .config import MergeConfig, load_config, parse_config
from .engine import MergeResult, merge
from .methods import MergeMethod, get_method, register

__all__ = ["merge", "MergeResult", "MergeConfig", "load_config", "parse_config", "MergeMethod",
           "get_method", "register"]
