"""mergekit YAML configs, read as they are, for the classic merges (docs/classic_merges.md).

A file with a top-level ``merge_method:`` key is a mergekit config (mergekit 0.1.5's
MergeConfiguration). :func:`from_mergekit` turns it into this package's own config mapping
(``method: ties``, ``backbone:``, ``models:``, ``parameters:``, ``output: {dtype}``), which
:func:`safepatch_merge.merge.config.load_config` then parses like any other. This module also
holds the classic section's grammar (:class:`ClassicParams`), shared by both forms; it
imports no torch. Every key
mergekit defines but we do not implement is an error naming the key (mergekit itself ignores
unknown keys; we refuse them too, so nothing is silently dropped).

Parameter settings follow mergekit's grammar (config.evaluate_setting): a scalar; a
conditional ``{filter: SUBSTRING, value: SCALAR}`` or a list of them (the first whose filter
is absent, ``*`` or a substring of the tensor name applies; none -> the next scope); lists of
scalars are gradients over layers and are not supported. Precedence: a model's own
``parameters``, then the top-level ``parameters``, then the method's default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .classic.spec import (DEFAULT_DENSITY, DEFAULT_LAMBDA, METHODS, MODEL_PARAMETERS,
                           SHARED_PARAMETERS, MethodSpec, TensorParams)

# Top-level keys of mergekit's MergeConfiguration and what we do with them.
SUPPORTED_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                  "tokenizer_source")
UNSUPPORTED_KEYS = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under models:",
    "modules": "per-module definitions are not supported; list whole models under models:",
    "tokenizer": "tokenizer surgery is not supported (the output keeps the base model's "
                 "tokenizer)",
    "chat_template": "setting a chat template is not supported (the base model's is kept)",
}
MODEL_KEYS = ("model", "parameters")
DTYPES = ("float32", "bfloat16", "float16")
_TRUE = ("true", "t", "yes", "y", "on", "1")
_FALSE = ("false", "f", "no", "n", "off", "0")


def is_mergekit_config(raw: Any) -> bool:
    """True for a mapping with mergekit's ``merge_method`` key."""
    return isinstance(raw, dict) and "merge_method" in raw


def _model_ref(v: Any, where: str) -> str:
    """A mergekit ModelReference as a local path or Hub id; LoRA (+), revisions (@) and
    architecture overrides are errors naming `where`."""
    if isinstance(v, dict):
        extra = [k for k in v if k not in ("model",)]
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: not supported (give a plain model path)")
        inner = v.get("model")
        if isinstance(inner, dict):
            extra = [k for k in inner if k != "path"]
            if extra:
                raise ConfigError(f"{where}.model.{extra[0]}: not supported "
                                  "(give a plain model path)")
            inner = inner.get("path")
        v = inner
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: expected a model path or Hub id, got {v!r}")
    if "+" in v:
        raise ConfigError(f"{where}: {v!r} names a LoRA adapter (model+lora), which is not "
                          "supported; merge the adapter into the model first")
    if "@" in v:
        raise ConfigError(f"{where}: {v!r} pins a revision (@), which is not supported; "
                          "give a local directory")
    return v


def _dtype(v: Any, where: str) -> str:
    name = v[len("torch."):] if isinstance(v, str) and v.startswith("torch.") else v
    if name not in DTYPES:
        raise ConfigError(f"{where}: expected one of {', '.join(DTYPES)}, got {v!r}")
    return name


def parse_scalar(v: Any, kind: type, where: str):
    """Validate a scalar like mergekit's pydantic types do (numbers in strings such as
    "1e-3", which YAML reads as text, are numbers; bools accept true/false/yes/no/1/0)."""
    if kind is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            return v.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {v!r}")
    if isinstance(v, bool):
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {v!r}") from None
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Setting:
    """A parsed parameter setting: [(filter or None, value)], tried in order."""

    conds: tuple[tuple[str | None, Any], ...]

    def evaluate(self, tensor_name: str):
        """The value for `tensor_name`, or None when no filter matches (next scope)."""
        for flt, value in self.conds:
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return value
        return None


def parse_setting(v: Any, kind: type, where: str) -> Setting:
    """Parse one parameter setting (scalar or conditional); gradients are errors."""
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        if not v:
            raise ConfigError(f"{where}: empty list")
        if all(not isinstance(e, dict) for e in v):
            raise ConfigError(f"{where}: a list of values is a gradient over layers, which is "
                              "not supported; give one value or {filter, value} conditions")
        conds = []
        for i, c in enumerate(v):
            w = f"{where}[{i}]"
            if not isinstance(c, dict):
                raise ConfigError(f"{w}: expected a {{filter, value}} mapping, got {c!r}")
            for k in c:
                if k not in ("filter", "value"):
                    raise ConfigError(f"unknown config key {w}.{k} (allowed: filter, value)")
            if "value" not in c:
                raise ConfigError(f"{w}.value: missing")
            flt = c.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(f"{w}.filter: expected a string, got {flt!r}")
            inner = c["value"]
            if isinstance(inner, (list, dict)):
                raise ConfigError(f"{w}.value: gradients and nested conditions are not "
                                  "supported; give one value")
            conds.append((flt, parse_scalar(inner, kind, f"{w}.value")))
        return Setting(tuple(conds))
    return Setting(((None, parse_scalar(v, kind, where)),))


def parse_parameters(d: Any, where: str, allowed: dict[str, type],
                     method: str) -> dict[str, Setting]:
    """{name: Setting} of a `parameters` mapping; keys outside `allowed` are errors."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        if k not in allowed:
            if k in SHARED_PARAMETERS:
                raise ConfigError(f"{where}.{k}: a parameter shared by all models; set it in "
                                  "the top-level parameters (mergekit ignores it here)")
            raise ConfigError(f"unknown config key {where}.{k}: not a parameter of {method} "
                              f"(allowed: {', '.join(allowed)})")
        out[k] = parse_setting(v, allowed[k], f"{where}.{k}")
    return out


@dataclass(frozen=True)
class ClassicPlan:
    """A classic merge's method section, parsed: model sources in order, each model's
    parameter settings, and the top-level ones."""

    method: MethodSpec
    models: tuple[str, ...]
    model_params: tuple[dict[str, Setting], ...]
    global_params: dict[str, Setting]

    def tensor_params(self, tensor_name: str) -> TensorParams:
        """Resolve every parameter for one tensor; ConfigError if a weight is missing or a
        density is out of [0, 1]."""
        def get(scopes, key):
            for s in scopes:
                if key in s:
                    v = s[key].evaluate(tensor_name)
                    if v is not None:
                        return v
            return None

        weights, densities = [], []
        for i, mp in enumerate(self.model_params):
            w = get((mp, self.global_params), "weight")
            if w is None:
                raise ConfigError(f"models[{i}].parameters.weight: missing for tensor "
                                  f"{tensor_name!r} (mergekit requires a weight per model)")
            dens = get((mp, self.global_params), "density")
            dens = DEFAULT_DENSITY if dens is None else dens
            if not 0.0 <= dens <= 1.0:
                raise ConfigError(f"models[{i}].parameters.density = {dens!r} for tensor "
                                  f"{tensor_name!r} is out of range [0, 1]")
            weights.append(w)
            densities.append(dens)
        g = (self.global_params,)
        normalize, rescale, lam = get(g, "normalize"), get(g, "rescale"), get(g, "lambda")
        return TensorParams(
            tuple(weights), tuple(densities),
            self.method.default_normalize if normalize is None else normalize,
            self.method.default_rescale if rescale is None else rescale,
            DEFAULT_LAMBDA if lam is None else lam)


def parse_classic_section(method: str, backbone: str, models: Any, parameters: Any,
                          model_key: str = "models") -> ClassicPlan:
    """Parse the models list and top-level parameters of a classic merge (the native and the
    mergekit form share this grammar). Models equal to the backbone are the base: mergekit
    ignores their weight/density, and so do we."""
    spec = METHODS[method]
    if models is None or not isinstance(models, list) or not models:
        raise ConfigError(f"{model_key}: expected a non-empty list of {{model, parameters}}")
    srcs, params = [], []
    for i, m in enumerate(models):
        where = f"{model_key}[{i}]"
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: expected a mapping with model: and parameters:")
        for k in m:
            if k not in MODEL_KEYS:
                raise ConfigError(f"unknown config key {where}.{k} (allowed: "
                                  f"{', '.join(MODEL_KEYS)})")
        if "model" not in m:
            raise ConfigError(f"{where}.model: missing")
        src = _model_ref(m["model"], f"{where}.model")
        p = parse_parameters(m.get("parameters"), f"{where}.parameters",
                             MODEL_PARAMETERS, method)
        if src == backbone:
            continue
        if src in srcs:
            raise ConfigError(f"{where}.model: {src!r} is listed twice")
        srcs.append(src)
        params.append(p)
    if not srcs:
        raise ConfigError(f"{model_key}: no model besides the base model {backbone!r}")
    glob = parse_parameters(parameters, "parameters", {**SHARED_PARAMETERS, **MODEL_PARAMETERS},
                            method)
    plan = ClassicPlan(spec, tuple(srcs), tuple(params), glob)
    for i, mp in enumerate(plan.model_params):  # a weight must come from somewhere
        if "weight" not in mp and "weight" not in glob:
            raise ConfigError(f"{model_key}[{i}].parameters.weight: missing (mergekit "
                              "requires a weight for every model but the base)")
    return plan


@dataclass(frozen=True)
class ClassicParams:
    """A classic merge's method section (native form; a mergekit file is translated first by
    :func:`from_mergekit`): the parsed models and parameters, and DARE's Philox seed."""

    config_keys: ClassVar[tuple[str, ...]] = ("models", "parameters", "seed")

    plan: ClassicPlan
    seed: int

    @classmethod
    def parse(cls, method: str, backbone: str, section: dict) -> "ClassicParams":
        """Validate `section` ({key: raw YAML value} for the keys in ``config_keys``) of
        classic method `method` merged into `backbone` (as written in the config)."""
        plan = parse_classic_section(method, backbone, section.get("models"),
                                     section.get("parameters"))
        seed = section.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
        return cls(plan, int(seed))


def from_mergekit(raw: dict, where: str = "mergekit config") -> dict:
    """This package's config mapping for a mergekit config mapping (see module docstring).

    Raises ConfigError naming the first unsupported or unknown key."""
    for k in raw:
        if k in UNSUPPORTED_KEYS:
            if raw[k] is None:
                continue
            raise ConfigError(f"{where}: key {k}: {UNSUPPORTED_KEYS[k]}")
        if k not in SUPPORTED_KEYS:
            raise ConfigError(f"{where}: unknown config key {k} (mergekit keys supported: "
                              f"{', '.join(SUPPORTED_KEYS)})")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"merge_method: {method!r} is not supported (supported: "
                          f"{', '.join(METHODS)})")
    if raw.get("base_model") is None:
        raise ConfigError(f"base_model: required for {method}")
    base = _model_ref(raw["base_model"], "base_model")
    tok = raw.get("tokenizer_source")
    if tok is not None and tok != "base":
        raise ConfigError(f"tokenizer_source: {tok!r} is not supported (only 'base': the "
                          "output keeps the base model's tokenizer and vocabulary)")
    out: dict[str, Any] = {}
    dt = raw.get("out_dtype") if raw.get("out_dtype") is not None else raw.get("dtype")
    if dt is not None:
        key = "out_dtype" if raw.get("out_dtype") is not None else "dtype"
        out["dtype"] = _dtype(dt, key)
    if raw.get("dtype") is not None:
        _dtype(raw["dtype"], "dtype")
    # Validate the whole section here so errors carry mergekit's key names.
    parse_classic_section(method, base, raw.get("models"), raw.get("parameters"))
    models = []
    for m in raw["models"]:
        ref = _model_ref(m["model"], "models")
        if ref != base:
            models.append({"model": ref, **({"parameters": m["parameters"]}
                                            if m.get("parameters") is not None else {})})
    native = {"method": method, "backbone": base, "models": models}
    if raw.get("parameters") is not None:
        native["parameters"] = raw["parameters"]
    if out:
        native["output"] = out
    return native
