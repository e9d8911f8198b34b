"""The merge configuration: YAML schema, parsing and validation (docs/merge_config.md).

Common keys (every method): ``method``, ``backbone``, ``output``, ``include``, ``exclude``,
``allow_pickle``, ``revision``. Method keys: each method's section is parsed by its params
type in :data:`METHOD_PARAMS` (SafePatching: safepatch_params.py; classic merges:
mergekit_config.py). Unknown keys anywhere are errors naming the key. A config is parsed once,
into immutable objects; nothing downstream re-reads the YAML mapping. Imports no torch, so
reading or checking a config stays fast.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Union

import yaml

from ..config_fields import check_keys
from ..errors import ConfigError, clip
from . import defaults
from .classic.spec import METHODS as CLASSIC_METHODS
from .config_values import get_bool, get_choice, get_str, parse_size
from .mergekit_config import ClassicParams, from_mergekit, is_mergekit_config
from .safepatch_params import SafepatchParams
from .yaml_load import DuplicateKeyError, safe_load_unique

__all__ = ["MergeConfig", "OutputConfig", "Source", "METHOD_PARAMS", "parse_config",
           "load_config", "read_yaml", "check_keys", "parse_size"]

OUTPUT_DTYPES = defaults.OUTPUT_DTYPES
COMMON_KEYS = ("method", "backbone", "output", "include", "exclude", "allow_pickle", "revision")
OUTPUT_KEYS = ("dtype", "max_shard_size", "copy_tokenizer", "model_card", "hash_inputs",
               "allow_nonfinite")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as huggingface_hub spells it

MethodParams = Union[SafepatchParams, ClassicParams]
# Every merge method by its config name, with the type its section parses into. The engine's
# implementation of each params type is in merge/registry.py.
METHOD_PARAMS: Mapping[str, type] = MappingProxyType(
    {"safepatch": SafepatchParams, **{name: ClassicParams for name in CLASSIC_METHODS}})


@dataclass(frozen=True)
class OutputConfig:
    dtype: str = defaults.OUTPUT_DTYPE
    max_shard_size: int = parse_size(defaults.MAX_SHARD_SIZE, "output.max_shard_size")
    copy_tokenizer: bool = True
    model_card: bool = True
    hash_inputs: bool = False  # sha256 of every input file's content into the provenance
    allow_nonfinite: bool = False  # write NaN/inf that a merge produces instead of failing


@dataclass(frozen=True)
class Source:
    """An input as the merge opens it: `path` (a local path or Hub id) and, when `path` was
    not found, `hint` saying where it was looked for (for the error that opening it raises)."""

    path: str
    hint: str | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A parsed config. `params`: the method's section, parsed (see METHOD_PARAMS). `raw`:
    the mapping as read, recorded in the provenance and the resume plan id."""

    method: str
    backbone: str
    params: MethodParams
    output: OutputConfig = field(default_factory=OutputConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow_pickle: bool = False
    revision: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    raw: Mapping[str, Any] = field(default_factory=dict)

    def locate(self, source: str) -> Source:
        """Where input `source` (as written in the config) is: a relative local path resolved
        against the config file's directory (never the working directory); absolute paths
        unchanged; ``org/name`` that exists nowhere locally stays a Hub id. A path that does
        not exist comes back resolved, with a hint naming where it was looked for."""
        p = Path(source).expanduser()
        if p.is_absolute():
            return Source(str(p))
        cand = self.base_dir / p
        if cand.exists():
            return Source(str(cand))
        here = Path.cwd() / p
        if here.exists() and here.resolve() != cand.resolve():
            return Source(str(cand), (
                f"no such directory beside the config ({cand}); {here} exists relative to the "
                "working directory, but relative paths are resolved against the config's "
                "directory (give an absolute path)"))
        where = (f"beside the config ({cand}) or in the working directory ({here})"
                 if here != cand else f"at {cand}")
        if HUB_ID.match(source) and not source.startswith("."):
            return Source(source, f"not a directory {where}")
        return Source(str(cand), f"no such directory {where}")


def _patterns(v: Any, key: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{key}: expected a glob pattern or a list of them, got {clip(v)}")
    return tuple(v)


def parse_config(raw: Any, base_dir: str | Path | None = None,
                 recorded: Mapping[str, Any] | None = None) -> MergeConfig:
    """Validate a config mapping (as loaded from YAML) into a MergeConfig; relative paths
    resolve against `base_dir` (default: the working directory). `recorded`: what the
    provenance records as the config (default `raw` itself)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    method = raw.get("method", "safepatch")
    kind = METHOD_PARAMS.get(method) if isinstance(method, str) else None
    if kind is None:
        raise ConfigError(f"method: unknown merge method {method!r} "
                          f"(known: {', '.join(sorted(METHOD_PARAMS))})")
    check_keys(raw, COMMON_KEYS + kind.config_keys, "")
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
    backbone = get_str(raw, "backbone", "")
    include = _patterns(raw.get("include"), "include")
    exclude = _patterns(raw.get("exclude"), "exclude")
    allow_pickle = get_bool(raw, "allow_pickle", False, "config")
    section = {k: raw[k] for k in kind.config_keys if k in raw}
    params = (SafepatchParams.parse(section) if kind is SafepatchParams
              else ClassicParams.parse(method, backbone, section))
    return MergeConfig(
        method=method, backbone=backbone, params=params, output=oc, include=include,
        exclude=exclude, allow_pickle=allow_pickle, revision=rev,
        base_dir=Path(base_dir).resolve() if base_dir is not None else Path.cwd(),
        raw=raw if recorded is None else recorded)


def read_yaml(path: Path) -> Any:
    """The parsed YAML file at `path` (safe_load); unreadable, invalid or empty, or a mapping
    with a key given twice (YAML keeps the last silently) -> ConfigError."""
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
    """Read and validate a YAML config file; `overrides` (top-level keys of this package's
    own form) replace its values. A mergekit config (a ``merge_method`` key) is translated
    first; its relative model paths resolve against the working directory, as mergekit's do,
    and the provenance records the file as given (plus any overrides)."""
    path = Path(path)
    raw = read_yaml(path)
    if is_mergekit_config(raw):
        native = {**from_mergekit(raw, str(path)), **(overrides or {})}
        recorded = {**raw, "safepatch_overrides": overrides} if overrides else raw
        return parse_config(native, base_dir=Path.cwd(), recorded=recorded)
    if overrides:
        raw = {**raw, **overrides}
    return parse_config(raw, base_dir=path.parent)
