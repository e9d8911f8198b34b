"""JSON from untrusted files (safetensors headers, checkpoint indexes), parsed the way the
safetensors library's parser (serde_json) accepts it, with bounded cost.

Python's ``json`` is more permissive than serde_json and can be made to crash: it accepts
``NaN``/``Infinity``, lone UTF-16 surrogates and nesting up to the interpreter's recursion
limit (beyond it: RecursionError), and it turns a long digit string into an int (slow, or a
ValueError past ``sys.get_int_max_str_digits``). Here those become :class:`JSONError` with a
short reason, numbers past the float range are errors as in serde_json, integers above
2**64 - 1 become floats (serde_json's reading, so they are never a valid size or offset), and
objects record their repeated keys (:class:`Obj`) for the caller to judge.
"""
from __future__ import annotations

import json
import math
import re

import torch

MAX_DEPTH = 127  # serde_json refuses the 128th nested array/object
_U64_MAX = 2**64 - 1
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


class JSONError(ValueError):
    """Input that is not JSON as serde_json reads it (the message is short, one line)."""


class Obj(dict):
    """A JSON object; ``dups`` holds the keys that appeared more than once (the last value
    is kept, as Python and serde_json maps both do)."""

    dups: frozenset = frozenset()


def _pairs(pairs: list) -> Obj:
    o = Obj(pairs)
    if len(o) != len(pairs):
        seen, dups = set(), set()
        for k, _ in pairs:
            (dups if k in seen else seen).add(k)
        o.dups = frozenset(dups)
    return o


def _int(text: str):
    if text.startswith("-"):
        return _float(text)  # never a size or an offset; -0 too (serde_json: a float)
    if len(text) > 20:  # >= 10**20 > 2**64: a float, like serde_json; never int() on it
        return _float(text)
    n = int(text)
    return n if n <= _U64_MAX else float(n)


def _float(text: str) -> float:
    v = float(text)
    if math.isinf(v):
        raise JSONError(f"number out of range ({text[:20]}...)")
    return v


def _constant(name: str):
    raise JSONError(f"{name} is not JSON")


def _depth(raw: bytes) -> int:
    """Maximum nesting of arrays/objects in `raw` (brackets inside strings ignored)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0  # cannot be deeper than the number of openings
    a = torch.frombuffer(bytearray(_STRING.sub(b"", raw)), dtype=torch.uint8)
    if a.numel() == 0:
        return 0
    step = ((a == 0x5B) | (a == 0x7B)).to(torch.int32) - ((a == 0x5D) | (a == 0x7D)).to(torch.int32)
    return int(torch.cumsum(step, 0, dtype=torch.int64).max())


def _check_strings(obj) -> None:
    """Refuse lone surrogates anywhere (serde_json refuses the escape; Python keeps it)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise JSONError("a string holds an unpaired UTF-16 surrogate escape") from None
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def first_duplicate(obj) -> str | None:
    """A key that some object anywhere inside `obj` repeats, else None."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if getattr(o, "dups", None):
                return sorted(o.dups)[0]
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return None


def loads(raw: bytes):
    """Parse UTF-8 JSON bytes as serde_json would; JSONError (one line) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONError(f"invalid UTF-8 at byte {e.start}") from None
    if _depth(raw) > MAX_DEPTH:
        raise JSONError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_int=_int, parse_float=_float,
                         parse_constant=_constant)
    except JSONError:
        raise
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} (line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise JSONError(f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, OverflowError) as e:  # e.g. a number Python cannot represent
        raise JSONError(" ".join(str(e).split())[:200]) from None
    _check_strings(obj)
    return obj
