"""Configurations declared once: a frozen dataclass whose fields carry their default, help
text and choices, from which the command-line options (`add_arguments`, `from_args`) and the
check of a YAML mapping (`from_mapping`) are derived.

A field is declared with `option(default, help=..., ...)`; its metadata:

- help: the `--help` text; `{default}` in it stands for the default.
- choices: the allowed values (argparse choices; the dataclass's own validation checks them
  for every other caller, with its own message).
- flag: the command-line flag when it is not `--name-with-dashes` (e.g. "--lr"); a bool that
  defaults to True needs one that turns it off (e.g. "--no-utility").
- metavar, group (title of the argparse argument group).
- append: a repeatable flag that collects a list (`--suite A --suite B`); unset means the
  field's default.
- required: the command line must give it (the default serves the Python API).
- cli=False: a YAML-only key; yaml=False: a command-line-only option (a field that is
  neither is the Python API's alone and may have any type).

The type of a field comes from its annotation: bool, int, float, str, or a list[X] or
tuple[X, ...] of one of them, each optionally `| None`. In YAML an int counts as a float, a
bool as neither, and a single string as a one-item list of strings. Nothing here imports
torch, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Mapping

from .errors import ConfigError, clip

class FieldError(ConfigError):
    """A bad value of one field, raised by a config's validation: `build` names it as
    `where.key` (a YAML key path)."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key}: {detail}")
        self.key, self.detail = key, detail


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def option(default: Any = dataclasses.MISSING, *, help: str | None = None,
           choices: tuple | None = None, flag: str | None = None, metavar: str | None = None,
           group: str | None = None, append: bool = False, required: bool = False,
           cli: bool = True, yaml: bool = True) -> Any:
    """A dataclass field with its command-line and YAML metadata (see the module docstring).
    A list default is copied for each instance; a field without a default must be given."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar,
            "group": group, "append": append, "required": required, "cli": cli,
            "yaml": yaml}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=tuple(default): list(d),
                                 metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class FieldType(typing.NamedTuple):
    """A field's parsed annotation: the scalar type, whether it is a list of them, and
    whether None is allowed."""

    scalar: type
    is_list: bool
    optional: bool

    def describe(self) -> str:
        what = f"a list of {_NAMES[self.scalar].split(' ', 1)[-1]}s" if self.is_list \
            else _NAMES[self.scalar]
        return what + (" or null" if self.optional else "")


def field_types(cls) -> dict[str, FieldType]:
    """{field name: FieldType} of the command-line and YAML fields of a config dataclass,
    from their annotations (a field that is neither may have any type)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) or f.metadata.get("yaml", True):
            out[f.name] = _parse_hint(hints[f.name], f"{cls.__name__}.{f.name}")
    return out


def _parse_hint(hint: Any, where: str) -> FieldType:
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            raise TypeError(f"{where}: unsupported annotation {hint!r}")
        hint = rest[0]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is list and len(args) == 1 and args[0] in _NAMES:
        return FieldType(args[0], True, optional)
    # tuple[X, ...]: a list on the command line and in YAML; the config keeps it as a tuple
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis \
            and args[0] in _NAMES:
        return FieldType(args[0], True, optional)
    if hint in _NAMES:
        return FieldType(hint, False, optional)
    raise TypeError(f"{where}: unsupported annotation {hint!r}")


def _default(f: dataclasses.Field) -> Any:
    """The field's default; None for a field without one (the caller must then give it)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def help_text(f: dataclasses.Field) -> str | None:
    """The field's help with `{default}` replaced by its default (a list's items joined by
    spaces, a float in %g form)."""
    text = f.metadata.get("help")
    if text is None or "{default}" not in text:
        return text
    d = _default(f)
    shown = " ".join(map(_show, d)) if isinstance(d, (list, tuple)) else _show(d)
    return text.replace("{default}", shown)


def _show(v: Any) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def add_arguments(parser: argparse.ArgumentParser, cls, *,
                  groups: dict[str, Any] | None = None) -> None:
    """Add one option per command-line field of `cls`, in declaration order,
    each with the field's default, type, choices and help. `groups` (title -> argparse group)
    collects the groups made along the way; pass the same dict to several calls to share
    them."""
    groups = {} if groups is None else groups
    ftypes = field_types(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        t = ftypes[f.name]
        title = m.get("group")
        if title is None:
            target = parser
        else:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        kw: dict[str, Any] = {"dest": f.name}
        default = _default(f)
        if m.get("help") is not None:
            kw["help"] = help_text(f)
        if m.get("metavar") is not None:
            kw["metavar"] = m["metavar"]
        flag = m.get("flag") or "--" + f.name.replace("_", "-")
        if t.scalar is bool and not t.is_list:
            if default is True:
                if not m.get("flag"):
                    raise TypeError(f"{cls.__name__}.{f.name}: a true-by-default switch "
                                    "needs a flag that turns it off")
                kw["action"] = "store_false"
            else:
                kw["action"] = "store_true"
            target.add_argument(flag, **kw)
            continue
        if t.scalar is not str:
            kw["type"] = t.scalar
        if m.get("choices") is not None:
            kw["choices"] = m["choices"]
        if m.get("required"):
            kw["required"] = True
        if m.get("append"):
            kw["action"] = "append"
            kw["default"] = None  # argparse would append to a default list
        elif t.is_list:
            kw["nargs"] = "+"
            kw["default"] = default
        elif not m.get("required"):
            kw["default"] = default
        target.add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace, base: Mapping[str, Any] | None = None,
              **fixed: Any):
    """`cls` built from parsed arguments: `fixed`, then every command-line field that was
    given (a None value means not given), then `base`, then the field's default."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    values.update(fixed)
    return cls(**values)


def check_keys(mapping: Any, allowed: tuple[str, ...], where: str) -> dict:
    """`mapping` (None = empty) must be a mapping whose keys are all in `allowed`; the error
    names the first unknown key as `where.key`."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for k in mapping:
        if k not in allowed:
            shown = k if isinstance(k, str) and len(k) <= 120 else clip(k)
            raise ConfigError(f"unknown config key {where + '.' if where else ''}{shown} "
                              f"(allowed: {', '.join(allowed)})")
    return mapping


def check_mapping(cls, mapping: Any, where: str, *, extra: tuple[str, ...] = (),
                  skip: tuple[str, ...] = ()) -> dict:
    """The YAML mapping `mapping` checked against the YAML fields of `cls` but `skip`: every
    key must be one of them (or in `extra`, left unchecked) and every value of the field's
    type. Returns a copy in which a string given for a list of strings is a one-item list.
    Raises a one-line ConfigError naming the key (`where.key`)."""
    allowed = tuple(k for k in yaml_keys(cls) if k not in skip) + tuple(extra)
    mapping = check_keys(mapping, allowed, where)
    ftypes = field_types(cls)
    out = {}
    for k, v in mapping.items():
        if k in ftypes:
            v = _check_value(v, ftypes[k], f"{where + '.' if where else ''}{k}")
        out[k] = v
    return out


def from_mapping(cls, mapping: Any, where: str, **fixed: Any):
    """`cls` built from a YAML mapping checked by `check_mapping`, with `fixed` on top; the
    dataclass's own validation errors are prefixed with `where`."""
    values = {**check_mapping(cls, mapping, where), **fixed}
    return build(cls, values, where)


def build(cls, values: Mapping[str, Any], where: str):
    """`cls(**values)`, a ConfigError from its validation prefixed with `where` (a FieldError
    as `where.key: ...`)."""
    try:
        return cls(**values)
    except FieldError as e:
        raise ConfigError(f"{where}.{e.key}: {e.detail}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def yaml_keys(cls) -> tuple[str, ...]:
    """The keys a YAML mapping of `cls` may have, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True))


def yaml_values(obj) -> dict:
    """{key: value} of the YAML fields of a config object (lists copied)."""
    return {k: _copy(getattr(obj, k)) for k in yaml_keys(type(obj))}


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _check_value(v: Any, t: FieldType, key: str) -> Any:
    if v is None:
        if t.optional:
            return None
        raise ConfigError(f"{key}: expected {t.describe()}, got null")
    if t.is_list:
        if isinstance(v, str) and t.scalar is str:
            return [v]
        if not isinstance(v, list) or not all(_is(x, t.scalar) for x in v):
            raise ConfigError(f"{key}: expected {t.describe()}, got {clip(v)}")
        return list(v)
    if not _is(v, t.scalar):
        hint = ""
        if t.scalar in (int, float) and isinstance(v, str) and _numeric(v):
            hint = " (YAML reads a number without a decimal point, like 1e-5, as text; " \
                   "write 1.0e-5)"
        raise ConfigError(f"{key}: expected {t.describe()}, got {clip(v)}{hint}")
    return v


def _is(v: Any, scalar: type) -> bool:
    if scalar is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if scalar is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, scalar)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
