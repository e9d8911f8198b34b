"""The streaming merge: config schema, methods (SafePatching; classic merges plug in as
methods), exact thresholds, the engine, model card and provenance. Entry point: :func:`merge`.

Layout, lowest first: ``defaults``, ``config_values``, ``safepatch_params``,
``mergekit_config``, ``config`` (the config, no torch); ``methods`` (the method protocol) and
``stream`` (streaming under the memory budget); the methods (``safepatch_method``,
``classic/``, with ``thresholds``); ``registry`` (the method table); ``engine``.
"""
from .config import MergeConfig, load_config, parse_config

__all__ = ["merge", "MergeResult", "MergePlan", "MergeConfig", "load_config", "parse_config"]


def __getattr__(name: str):
    # The engine imports torch; reading a config must not, so it loads on first use.
    if name in ("merge", "MergeResult", "MergePlan"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
