"""The method table: which engine method implements each kind of parsed method section.

A method's config name and the params type its section parses into are declared once, in
``config.METHOD_PARAMS``; its implementation is declared once, here. Adding a method is one
params type, one entry in each of those two tables and the class; nothing registers itself
on import.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from .classic.method import ClassicMethod
from .config import MergeConfig
from .mergekit_config import ClassicParams
from .methods import MergeMethod
from .safepatch_method import SafepatchMethod
from .safepatch_params import SafepatchParams

METHODS: Mapping[type, type[MergeMethod]] = MappingProxyType({
    SafepatchParams: SafepatchMethod,
    ClassicParams: ClassicMethod,
})


def method_for(cfg: MergeConfig) -> MergeMethod:
    """A new instance of the method that merges as `cfg` says."""
    return METHODS[type(cfg.params)](cfg)
