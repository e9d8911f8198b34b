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
    eval:   {...}             # EvalConfig keys (enabled, backbone, suites, limit, ...)

A stage's own derive/score/merge/eval mappings are deep-merged over the top-level ones. The
derive, score and eval keys are the fields of DeriveConfig, ScoreConfig and EvalConfig
(config_fields.py checks each key and its type); unknown keys anywhere are errors naming the
key path; every value is checked by the owning config's own validation (and the merge section
by the merge config parser) before any work starts.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config_fields import build, check_keys, check_mapping, yaml_values
from ..derive.config import DeriveConfig
from ..derive.objective_table import SE_OBJECTIVES
from ..errors import ConfigError
from ..eval.config import EvalConfig
from ..score.config import ScoreConfig

TOP_KEYS = ("backbone", "device", "data", "stages", "derive", "score", "merge", "eval")
STAGE_KEYS = ("name", "data", "derive", "score", "merge", "eval")
SIDES = ("se", "osm")
OBJECTIVE = {"se": "ga", "osm": "gd"}
SIDE_OBJECTIVES = {"se": SE_OBJECTIVES, "osm": ("gd",)}
DEVICES = ("auto", "cpu", "cuda")
# The objective and a patch's own data file are per side, never shared by both patches.
DERIVE_SIDE_ONLY = ("objective",)
DERIVE_PATHS = ("retain_data", "calib_prompts", "calib_reference")
MERGE_KEYS = ("parameters", "patches", "output", "include", "exclude", "backend", "device",
              "max_memory")
MERGE_PATCH_KEYS = ("nonfinite",)  # patch paths and format are the pipeline's own
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class StageConfig:
    """One stage: harmful data and the fully resolved options of its four steps."""

    name: str
    data: str
    derive: dict[str, DeriveConfig]      # "se" / "osm"
    score: dict[str, ScoreConfig]        # "se" / "osm"
    merge: dict                          # merge section (parameters, patches, output, ...)
    eval: EvalConfig
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


@dataclass(frozen=True)
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
                            "merge": s.merge, "eval": yaml_values(s.eval)}
                           for s in self.stages]}


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


def _derive_configs(section: dict, device: str, where: str, base_dir: Path
                    ) -> tuple[dict[str, DeriveConfig], dict[str, str | None]]:
    """({se, osm}: DeriveConfig, {se, osm}: own data file or None)."""
    shared = check_mapping(DeriveConfig, section, where, extra=SIDES, skip=DERIVE_SIDE_ONLY)
    shared = {k: v for k, v in shared.items() if k not in SIDES}
    out, data = {}, {}
    for side in SIDES:
        opts = {**shared, **check_mapping(DeriveConfig, section.get(side), f"{where}.{side}",
                                          extra=("data",))}
        objective = opts.pop("objective", OBJECTIVE[side])
        if objective not in SIDE_OBJECTIVES[side]:
            raise ConfigError(f"{where}.{side}.objective: expected one of "
                              f"{', '.join(SIDE_OBJECTIVES[side])}, got {objective!r}")
        own = opts.pop("data", None)
        data[side] = _path(own, f"{where}.{side}.data", base_dir) if own is not None else None
        for k in DERIVE_PATHS:
            if opts.get(k) is not None:
                opts[k] = _path(opts[k], f"{where}.{side}.{k}", base_dir)
        opts.setdefault("device", device)
        out[side] = build(DeriveConfig, {**opts, "objective": objective}, f"{where}.{side}")
    return out, data


def _score_configs(section: dict, device: str, where: str) -> dict[str, ScoreConfig]:
    """{se, osm}: ScoreConfig, the shared keys with the side's own on top."""
    shared = check_mapping(ScoreConfig, section, where, extra=SIDES)
    shared = {k: v for k, v in shared.items() if k not in SIDES}
    out = {}
    for side in SIDES:
        opts = {**shared, **check_mapping(ScoreConfig, section.get(side), f"{where}.{side}")}
        opts.setdefault("device", device)
        out[side] = build(ScoreConfig, opts, f"{where}.{side}")
    return out


def _merge_section(section: dict, where: str) -> dict:
    check_keys(section, MERGE_KEYS, where)
    check_keys(section.get("patches"), MERGE_PATCH_KEYS, f"{where}.patches")
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


def _eval_section(section: dict, where: str, base_dir: Path) -> EvalConfig:
    ev = check_mapping(EvalConfig, section, where)
    if "suites" in ev:
        from ..eval.suites import PACKAGED

        ev["suites"] = [s if s in PACKAGED else _path(s, f"{where}.suites", base_dir)
                        for s in ev["suites"]]
    for k in ("utility_file", "guard"):
        if ev.get(k) is not None:
            ev[k] = _path(ev[k], f"{where}.{k}", base_dir)
    return build(EvalConfig, ev, where)


def _check_calibration_apart(derive: dict[str, DeriveConfig], ev: EvalConfig, where: str
                             ) -> None:
    """A behavioural stop must not calibrate on the answers whose perplexity is reported."""
    if not (ev.enabled and ev.utility):
        return
    from ..eval.utility import default_reference_path

    reported = Path(ev.utility_file or default_reference_path()).resolve()
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
    check_keys(raw, TOP_KEYS, "")
    if "backbone" not in raw:
        raise ConfigError("backbone: required (the model directory to patch)")
    backbone = _path(raw["backbone"], "backbone", base)
    device = raw.get("device", "auto")
    if device not in DEVICES:
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
        check_keys(st, STAGE_KEYS, where)
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
    from ..merge.config import read_yaml

    path = Path(path)
    raw = read_yaml(path)
    try:
        return parse_run_config(raw, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
