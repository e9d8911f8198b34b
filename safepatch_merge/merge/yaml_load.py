"""YAML configs loaded with PyYAML's safe loader, refusing a mapping key given twice.

PyYAML keeps the last of two equal keys without a word, so a config with ``alpha:`` twice
would merge with whichever came last; here it is an error naming the key and both lines.
"""
from __future__ import annotations

from typing import Any

import yaml

from ..errors import clip


class DuplicateKeyError(ValueError):
    """A mapping key given twice (the message names the key and both lines)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` may be overridden by explicit keys, by design
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        f"key {clip(key)} is given twice (lines {first + 1} and "
                        f"{key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load(text)``, but a mapping with a repeated key raises DuplicateKeyError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
