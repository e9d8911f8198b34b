"""The merge configuration: YAML schema, parsing and validation (docs/merge_config.md).

Common keys (every method): ``method``, ``backbone``, ``output``, ``include``, ``exclude``,
``allow_pickle``, ``revision``. Method keys: the method's own section is parsed by the method
class registered under ``method`` (see :mod:`.methods`), so classic merges add their keys
without touching this file. Unknown keys anywhere are errors naming the key.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, clip
from . import defaults

OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMMON_KEYS = ("method", "backbone", "output", "include", "exclude", "allow_pickle", "revision")
OUTPUT_KEYS = ("dtype", "max_shard_size", "copy_tokenizer", "model_card", "hash_inputs",
               "allow_nonfinite")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as huggingface_hub spells it
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


def check_keys(d: Any, allowed: tuple[str, ...], where: str) -> dict:
    """`d` must be a mapping whose keys are all in `allowed` (error names the first unknown)."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            shown = k if isinstance(k, str) and len(k) <= 120 else clip(k)
            raise ConfigError(f"unknown config key {where + '.' if where else ''}{shown} "
                              f"(allowed: {', '.join(allowed)})")
    return d


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


@dataclass
class OutputConfig:
    dtype: str = defaults.OUTPUT_DTYPE
    max_shard_size: int = parse_size(defaults.MAX_SHARD_SIZE, "output.max_shard_size")
    copy_tokenizer: bool = True
    model_card: bool = True
    hash_inputs: bool = False  # sha256 of every input file's content into the provenance
    allow_nonfinite: bool = False  # write NaN/inf that a merge produces instead of failing


@dataclass
class MergeConfig:
    """A parsed config. `method_params` is the raw method section, validated by the method."""

    method: str
    backbone: str
    output: OutputConfig = field(default_factory=OutputConfig)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    allow_pickle: bool = False
    revision: str | None = None
    method_params: dict = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    raw: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict, repr=False)  # see resolve()

    def resolve(self, source: str) -> str:
        """A relative local path resolved against the config file's directory (never the
        working directory); absolute paths unchanged; ``org/name`` that exists nowhere
        locally stays a Hub id. A path that does not exist is returned resolved, with a note
        for :meth:`hint` naming where it was looked for, so the error that opening it raises
        names both candidates."""
        p = Path(source).expanduser()
        if p.is_absolute():
            return str(p)
        cand = self.base_dir / p
        if cand.exists():
            return str(cand)
        here = Path.cwd() / p
        if here.exists() and here.resolve() != cand.resolve():
            self.hints[str(cand)] = (
                f"no such directory beside the config ({cand}); {here} exists relative to the "
                "working directory, but relative paths are resolved against the config's "
                "directory (give an absolute path)")
            return str(cand)
        where = (f"beside the config ({cand}) or in the working directory ({here})"
                 if here != cand else f"at {cand}")
        if _HUB_ID.match(source) and not source.startswith("."):
            self.hints[source] = f"not a directory {where}"
            return source
        self.hints[str(cand)] = f"no such directory {where}"
        return str(cand)

    def hint(self, resolved: str) -> str | None:
        """Where `resolve` looked for a path it returned but did not find (None if found)."""
        return self.hints.get(resolved)


def _patterns(v: Any, key: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{key}: expected a glob pattern or a list of them, got {clip(v)}")
    return list(v)


def parse_config(raw: Any, base_dir: str | Path | None = None) -> MergeConfig:
    """Validate a config mapping (as loaded from YAML). The method's own keys are checked by
    the method (see :func:`safepatch_merge.merge.methods.get_method`)."""
    from .methods import get_method

    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    method = raw.get("method", "safepatch")
    cls = get_method(method)
    allowed = COMMON_KEYS + tuple(cls.config_keys)
    check_keys(raw, allowed, "")
    out = check_keys(raw.get("output"), OUTPUT_KEYS, "output")
    oc = OutputConfig(
        dtype=get_choice(out, "dtype", defaults.OUTPUT_DTYPE, OUTPUT_DTYPES, "output"),
        max_shard_size=parse_size(out.get("max_shard_size", defaults.MAX_SHARD_SIZE),
                                  "output.max_shard_size"),
        copy_tokenizer=get_bool(out, "copy_tokenizer", True, "output"),
        model_card=get_bool(out, "model_card", True, "output"),
        hash_inputs=get_bool(out, "hash_inputs", False, "output"),
        allow_nonfinite=get_bool(out, "allow_nonfinite", False, "output"),
    )
    rev = raw.get("revision")
    if rev is not None and not isinstance(rev, str):
        raise ConfigError(f"revision: expected a string, got {clip(rev)}")
    cfg = MergeConfig(
        method=method, backbone=get_str(raw, "backbone", ""), output=oc,
        include=_patterns(raw.get("include"), "include"),
        exclude=_patterns(raw.get("exclude"), "exclude"),
        allow_pickle=get_bool(raw, "allow_pickle", False, "config"),
        revision=rev,
        method_params={k: raw[k] for k in cls.config_keys if k in raw},
        base_dir=Path(base_dir).resolve() if base_dir is not None else Path.cwd(), raw=raw,
    )
    cls.validate(cfg)
    return cfg


def read_yaml(path: Path) -> Any:
    """The parsed YAML file at `path` (safe_load); unreadable, invalid or empty, or a mapping
    with a key given twice (YAML keeps the last silently) -> ConfigError."""
    import yaml

    from .yaml_load import DuplicateKeyError, safe_load_unique

    try:
        raw = safe_load_unique(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())[:300]})") from None
    if raw is None:
        raise ConfigError(f"{path}: empty config")
    return raw


def load_config(path: str | Path, overrides: dict | None = None) -> MergeConfig:
    """Read and validate a YAML config file; `overrides` (top-level keys) replace its values."""
    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw, dict) and "merge_method" in raw:  # a mergekit config, read as is
        from .mergekit_config import load_mergekit_config

        return load_mergekit_config(path, raw, overrides=overrides)
    if overrides:
        raw = {**raw, **overrides}
    return parse_config(raw, base_dir=path.parent)
