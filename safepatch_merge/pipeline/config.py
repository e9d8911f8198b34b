"""The `safepatch run` configuration: YAML schema, parsing and validation (docs/run_config.md).

Top level::

    backbone: PATH            # the aligned model θ (stage 1's backbone)
    device: auto              # derive / score / eval device (auto | cpu | cuda)
    data: PATH                # single-stage shorthand for stages: [{name: main, data: PATH}]
    stages:                   # continual patching: stage k's patched model is stage k+1's backbone
      - {name: s1, data: PATH, derive: {...}, score: {...}, merge: {...}, eval: {...}}
    derive: {...}             # DeriveConfig keys shared by both patches, plus se: / osm: overrides
                              # (se: may set objective ga|npo|graddiff|refusal_sft and its own
                              # data file; osm is gradient descent on the stage data)
    score:  {...}             # ScoreConfig keys shared by both patches, plus se: / osm: overrides
    merge:  {parameters, patches, output, include, exclude, backend, device, max_memory}
    eval:   {enabled, backbone, suites, limit, ..., see EVAL_KEYS}

A stage's own derive/score/merge/eval mappings are deep-merged over the top-level ones. Unknown
keys anywhere are errors naming the key path; every value is checked by the owning module's own
validation (DeriveConfig.validate, ScoreConfig.validate, the merge config parser) before any
work starts.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..derive.train import SE_OBJECTIVES, DeriveConfig
from ..errors import ConfigError
from ..merge.config import check_keys, read_yaml
from ..score.api import ScoreConfig

TOP_KEYS = ("backbone", "device", "data", "stages", "derive", "score", "merge", "eval")
STAGE_KEYS = ("name", "data", "derive", "score", "merge", "eval")
SIDES = ("se", "osm")
OBJECTIVE = {"se": "ga", "osm": "gd"}
SIDE_OBJECTIVES = {"se": SE_OBJECTIVES, "osm": ("gd",)}
# Derive keys shared by both patches; the objective and a patch's own data file are per side.
DERIVE_KEYS = tuple(f.name for f in fields(DeriveConfig) if f.name not in ("objective",))
DERIVE_SIDE_KEYS = DERIVE_KEYS + ("objective", "data")
DERIVE_PATHS = ("retain_data", "calib_prompts", "calib_reference")
SCORE_KEYS = tuple(f.name for f in fields(ScoreConfig))
MERGE_KEYS = ("parameters", "patches", "output", "include", "exclude", "backend", "device",
              "max_memory")
MERGE_PATCH_KEYS = ("nonfinite",)  # patch paths and format are the pipeline's own
EVAL_KEYS = ("enabled", "backbone", "suites", "limit", "subset_seed", "dedup",
             "fuzzy_threshold", "max_new_tokens", "temperature", "top_p", "seed",
             "system_prompt", "batch_size", "dtype", "guard", "guard_kind", "utility",
             "utility_file", "utility_limit", "utility_max_tokens")
EVAL_DEFAULTS = {"enabled": True, "backbone": True,
                 "suites": ["xstest", "harmbench", "strongreject", "advbench"],
                 "limit": None, "subset_seed": 0, "dedup": True, "fuzzy_threshold": 0.85,
                 "max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0,
                 "system_prompt": None, "batch_size": 8, "dtype": "auto", "guard": None,
                 "guard_kind": "auto", "utility": True, "utility_file": None,
                 "utility_limit": None, "utility_max_tokens": 256}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class StageConfig:
    """One stage: harmful data and the fully resolved options of its four steps."""

    name: str
    data: str
    derive: dict[str, DeriveConfig]      # "se" / "osm"
    score: dict[str, ScoreConfig]        # "se" / "osm"
    merge: dict                          # merge section (parameters, patches, output, ...)
    eval: dict                           # every EVAL_KEYS key
    derive_data: dict = field(default_factory=dict)  # side -> its own data file (or None)

    def train_data(self, side: str) -> str:
        """The file the side's patch trains on: its own `data`, else the stage's."""
        return self.derive_data.get(side) or self.data

    def training_files(self) -> list[str]:
        """Every file the stage's derivations read prompts from (training data, retain sets,
        calibration files): evaluation prompts matching any of them are dropped."""
        files = [self.data] + [d for d in self.derive_data.values() if d]
        for dc in self.derive.values():
            files += [getattr(dc, k) for k in DERIVE_PATHS if getattr(dc, k)]
        return list(dict.fromkeys(files))


@dataclass
class RunConfig:
    """A parsed, validated run config. Paths are absolute (relative ones are resolved
    against the config file's directory)."""

    backbone: str
    device: str
    stages: list[StageConfig]
    raw: dict = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)

    def summary(self) -> dict:
        """JSON-ready resolved config (what the run actually uses)."""
        return {"backbone": self.backbone, "device": self.device,
                "stages": [{"name": s.name, "data": s.data,
                            "derive": {k: asdict(v) for k, v in s.derive.items()},
                            "derive_data": s.derive_data,
                            "score": {k: asdict(v) for k, v in s.score.items()},
                            "merge": s.merge, "eval": s.eval} for s in self.stages]}


_check_keys = check_keys  # one implementation of the unknown-key rule for every YAML schema


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`; mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _path(v: Any, key: str, base_dir: Path) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: expected a path, got {v!r}")
    p = Path(v).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def _side_options(section: dict, keys: tuple[str, ...], where: str) -> dict[str, dict]:
    """{se: opts, osm: opts}: shared keys with the side's own keys on top."""
    _check_keys(section, keys + SIDES, where)
    shared = {k: v for k, v in section.items() if k not in SIDES}
    return {s: {**shared, **_check_keys(section.get(s), keys, f"{where}.{s}")} for s in SIDES}


def _build(cls, opts: dict, where: str, **fixed):
    try:
        obj = cls(**{**opts, **fixed})
    except TypeError as e:  # a wrong type that the dataclass itself trips on
        raise ConfigError(f"{where}: {e}") from None
    try:
        obj.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return obj


def _derive_configs(section: dict, device: str, where: str, base_dir: Path
                    ) -> tuple[dict[str, DeriveConfig], dict[str, str | None]]:
    """({se, osm}: DeriveConfig, {se, osm}: own data file or None)."""
    _check_keys(section, DERIVE_KEYS + SIDES, where)
    shared = {k: v for k, v in section.items() if k not in SIDES}
    out, data = {}, {}
    for side in SIDES:
        opts = {**shared, **_check_keys(section.get(side), DERIVE_SIDE_KEYS, f"{where}.{side}")}
        objective = opts.pop("objective", OBJECTIVE[side])
        if objective not in SIDE_OBJECTIVES[side]:
            raise ConfigError(f"{where}.{side}.objective: expected one of "
                              f"{', '.join(SIDE_OBJECTIVES[side])}, got {objective!r}")
        own = opts.pop("data", None)
        data[side] = _path(own, f"{where}.{side}.data", base_dir) if own is not None else None
        for k in DERIVE_PATHS:
            if opts.get(k) is not None:
                opts[k] = _path(opts[k], f"{where}.{side}.{k}", base_dir)
        for k in ("lora_target", "train_include", "train_exclude", "stop_when"):
            if k in opts and isinstance(opts[k], str):
                opts[k] = [opts[k]]
        opts.setdefault("device", device)
        out[side] = _build(DeriveConfig, opts, f"{where}.{side}", objective=objective)
    return out, data


def _score_configs(section: dict, device: str, where: str) -> dict[str, ScoreConfig]:
    out = {}
    for side, opts in _side_options(section, SCORE_KEYS, where).items():
        opts.setdefault("device", device)
        out[side] = _build(ScoreConfig, opts, f"{where}.{side}")
    return out


def _merge_section(section: dict, where: str) -> dict:
    _check_keys(section, MERGE_KEYS, where)
    _check_keys(section.get("patches"), MERGE_PATCH_KEYS, f"{where}.patches")
    # Validate with the merge module's own parser on a stand-in config; the pipeline fills in
    # the real backbone / patch / score paths per stage.
    from ..merge.config import parse_config

    trial = merge_config_dict(section, "backbone", {"se": "patch_se", "osm": "patch_osm"},
                              {"se": "scores_se", "osm": "scores_osm"})
    try:
        parse_config(trial)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    dev = section.get("device", "cpu")
    if not isinstance(dev, str):
        raise ConfigError(f"{where}.device: expected cpu, cuda or cuda:N, got {dev!r}")
    be = section.get("backend")
    if be is not None and be not in ("auto", "reference", "cpp", "triton"):
        raise ConfigError(f"{where}.backend: expected auto, reference, cpp or triton, got {be!r}")
    return section


def merge_config_dict(section: dict, backbone: str, patches: dict, scores: dict) -> dict:
    """The merge engine's config mapping (docs/merge_config.md) for one stage."""
    cfg = {"method": "safepatch", "backbone": backbone,
           "patches": {**(section.get("patches") or {}), **patches, "format": "full"},
           "scores": dict(scores),
           "parameters": dict(section.get("parameters") or {})}
    for k in ("output", "include", "exclude"):
        if section.get(k) is not None:
            cfg[k] = copy.deepcopy(section[k])
    return cfg


def _eval_section(section: dict, where: str, base_dir: Path) -> dict:
    _check_keys(section, EVAL_KEYS, where)
    ev = {**EVAL_DEFAULTS, **section}
    for k in ("enabled", "backbone", "dedup", "utility"):
        if not isinstance(ev[k], bool):
            raise ConfigError(f"{where}.{k}: expected true or false, got {ev[k]!r}")
    if isinstance(ev["suites"], str):
        ev["suites"] = [ev["suites"]]
    if not isinstance(ev["suites"], list) or not ev["suites"] or \
            not all(isinstance(s, str) and s for s in ev["suites"]):
        raise ConfigError(f"{where}.suites: expected a non-empty list of suite names or files")
    from ..eval.suites import PACKAGED
    ev["suites"] = [s if s in PACKAGED else _path(s, f"{where}.suites", base_dir)
                    for s in ev["suites"]]
    for k in ("limit", "utility_limit"):
        v = ev[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}.{k}: expected a positive integer or null, got {v!r}")
    for k in ("max_new_tokens", "batch_size", "utility_max_tokens"):
        v = ev[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}.{k}: expected a positive integer, got {v!r}")
    for k in ("temperature", "top_p", "fuzzy_threshold"):
        v = ev[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}.{k}: expected a number, got {v!r}")
    from ..eval.generate import GenerationSettings
    try:
        GenerationSettings(max_new_tokens=ev["max_new_tokens"], temperature=ev["temperature"],
                           top_p=ev["top_p"], seed=ev["seed"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for k in ("utility_file", "guard"):
        if ev[k] is not None:
            ev[k] = _path(ev[k], f"{where}.{k}", base_dir)
    return ev


def _check_calibration_apart(derive: dict[str, DeriveConfig], ev: dict, where: str) -> None:
    """A behavioural stop must not calibrate on the answers whose perplexity is reported."""
    if not (ev["enabled"] and ev["utility"]):
        return
    from ..eval.utility import default_reference_path

    reported = Path(ev["utility_file"] or default_reference_path()).resolve()
    for side, dc in derive.items():
        if dc.calib_reference and Path(dc.calib_reference).resolve() == reported:
            raise ConfigError(f"{where}.derive.{side}.calib_reference is the eval's utility "
                              "file: the reported perplexity would be measured on the stop's "
                              "own calibration answers; give a disjoint file")


def parse_run_config(raw: Any, base_dir: str | Path | None = None) -> RunConfig:
    """Validate a run config mapping (as loaded from YAML); relative paths are resolved
    against `base_dir` (the config file's directory). Raises ConfigError naming the key."""
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, "")
    if "backbone" not in raw:
        raise ConfigError("backbone: required (the model directory to patch)")
    backbone = _path(raw["backbone"], "backbone", base)
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda, got {device!r}")
    stages_raw = raw.get("stages")
    if stages_raw is None:
        if "data" not in raw:
            raise ConfigError("stages: required (or give `data` for a single stage)")
        stages_raw = [{"name": "main", "data": raw["data"]}]
    elif "data" in raw:
        raise ConfigError("data: give either top-level data (one stage) or stages, not both")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("stages: expected a non-empty list")
    top = {k: raw.get(k) or {} for k in ("derive", "score", "merge", "eval")}
    for k, v in top.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{k}: expected a mapping, got {type(v).__name__}")
    stages, names = [], set()
    for i, st in enumerate(stages_raw):
        where = f"stages[{i}]"
        _check_keys(st, STAGE_KEYS, where)
        name = st.get("name", f"stage{i + 1}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}.name: expected letters, digits, _ . - (<= 64), got {name!r}")
        if name in names:
            raise ConfigError(f"{where}.name: duplicate stage name {name!r}")
        names.add(name)
        if "data" not in st:
            raise ConfigError(f"{where}.data: required (the stage's harmful pairs)")
        data = _path(st["data"], f"{where}.data", base)
        for k in top:
            if st.get(k) is not None and not isinstance(st[k], dict):
                raise ConfigError(f"{where}.{k}: expected a mapping, got {type(st[k]).__name__}")
        sec = {k: deep_merge(top[k], st.get(k) or {}) for k in top}
        derive, derive_data = _derive_configs(sec["derive"], device, f"{where}.derive", base)
        ev = _eval_section(sec["eval"], f"{where}.eval", base)
        _check_calibration_apart(derive, ev, where)
        stages.append(StageConfig(
            name=name, data=data, derive=derive,
            score=_score_configs(sec["score"], device, f"{where}.score"),
            merge=_merge_section(sec["merge"], f"{where}.merge"), eval=ev,
            derive_data=derive_data))
    return RunConfig(backbone=backbone, device=device, stages=stages, raw=raw, base_dir=base)


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config file."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        return parse_run_config(raw, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
