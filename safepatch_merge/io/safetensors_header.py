"""Parse, validate and build safetensors headers without loading any tensor data.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length
N, N bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}, then the data region; offsets are relative to the data region.

Reading accepts what the safetensors library accepts and refuses what it refuses (JSON read
as serde_json reads it, tensors in any order, contiguous from byte 0 and covering the data
region exactly, sizes in u64 arithmetic), except for three forms it tolerates and we refuse:
dtypes torch cannot hold here (F4, F6_*, F8_E8M0, C64), a tensor entry written as a JSON
array, and a dtype written as a {"F32": null} object. Every refusal is a one-line
CheckpointError naming the file (and the tensor). Writing follows what safetensors and
transformers accept: offsets contiguous from 0 and covering the data exactly,
``__metadata__ = {"format": "pt"}``, header padded with spaces to a multiple of 8 bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, clip
from . import safe_json
from .links import open_regular

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _name, _attr, _size in (("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1),
                            ("U16", "uint16", 2), ("U32", "uint32", 4), ("U64", "uint64", 8)):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), _size)
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items()}
FLOAT_ST = ("F32", "BF16", "F16")

# safetensors refuses headers above 100 MB; a bigger one is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. start/end: absolute byte offsets in `path` (end exclusive)."""

    name: str
    path: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Header:
    """A parsed safetensors file: tensors in file (offset) order, metadata, raw header bytes."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: bytes
    file_size: int


# every dtype name the safetensors format defines (others are not safetensors at all)
ST_DTYPE_NAMES = frozenset(("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2",
                            "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32",
                            "F32", "C64", "F64", "I64", "U64"))
_U64_MAX = 2**64 - 1
_FIELDS = ("dtype", "shape", "data_offsets")


def _name(name: str) -> str:
    return clip(name, 200)


def _is_u64(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U64_MAX


def _entry(path: Path, name: str, ent) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked field by field."""
    where = f"{path}: tensor {_name(name)}"
    if not isinstance(ent, dict):
        raise CheckpointError(f"{where}: corrupt header entry (not a JSON object)")
    dup = set(getattr(ent, "dups", ())) & set(_FIELDS)
    if dup:
        raise CheckpointError(f"{where}: corrupt header entry (field {sorted(dup)[0]} repeated)")
    missing = [k for k in _FIELDS if k not in ent]
    if missing:
        raise CheckpointError(f"{where}: corrupt header entry (no {missing[0]})")
    dt, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
    if not isinstance(dt, str) or dt not in ST_DTYPE_NAMES:
        raise CheckpointError(f"{where}: invalid dtype {clip(dt, 40)}")
    if dt not in DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {dt!r}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise CheckpointError(f"{where}: invalid shape {clip(shape, 80)}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_u64(o) for o in offs):
        raise CheckpointError(f"{where}: invalid data_offsets {clip(offs, 80)}")
    numel = 1
    for d in shape:  # in order, overflow-checked, as safetensors computes it
        numel *= d
        if numel > _U64_MAX:
            raise CheckpointError(f"{where}: shape {clip(shape, 80)} overflows 64 bits")
    if numel * DTYPES[dt][1] * 8 > _U64_MAX:  # safetensors counts bits
        raise CheckpointError(f"{where}: shape {clip(shape, 80)} overflows 64 bits")
    return dt, tuple(shape), offs[0], offs[1]


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of safetensors file `path`.

    Raises CheckpointError naming the file (and tensor) when it is not a regular file, is
    truncated, its header is oversized or not JSON (as the safetensors library reads JSON), a
    dtype is unknown, a shape is invalid or overflows, or the tensors' byte ranges do not tile
    the data region exactly (a range outside the file, a gap, an overlap, trailing bytes, a
    size that disagrees with dtype x shape).
    """
    path = Path(path)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, "
                                  "no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n} "
                                  f"(file has {size} bytes; limit {MAX_HEADER_BYTES})")
        raw = b""
        while len(raw) < n:
            chunk = os.pread(fd, n - len(raw), 8 + len(raw))
            if not chunk:
                raise CheckpointError(f"{path}: truncated safetensors header")
            raw += chunk
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    try:
        obj = safe_json.loads(raw)
    except safe_json.JSONError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    if "__metadata__" in getattr(obj, "dups", ()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ repeated)")
    meta = obj.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an "
                              "object of strings)")
    data_start, data_len = 8 + n, size - 8 - n
    infos = []
    for name, ent in obj.items():
        dt, shape, b, e = _entry(path, name, ent)
        where = f"{path}: tensor {_name(name)}"
        if e < b:
            raise CheckpointError(f"{where}: invalid data_offsets [{b}, {e}]")
        if e > data_len:
            raise CheckpointError(f"{where}: data ends at byte {data_start + e} but the file has "
                                  f"{size} bytes (truncated shard?)")
        want = math.prod(shape) * DTYPES[dt][1]
        if e - b != want:
            raise CheckpointError(f"{where}: {e - b} data bytes but dtype {dt} x shape "
                                  f"{clip(list(shape), 80)} needs {want}")
        infos.append(TensorInfo(name, path, dt, shape, data_start + b, data_start + e))
    infos.sort(key=lambda t: (t.start, t.end))
    pos = data_start
    for prev, cur in zip([None] + infos, infos):
        if cur.start < pos:
            raise CheckpointError(f"{path}: tensors {_name(prev.name)} and {_name(cur.name)} "
                                  "overlap")
        if cur.start > pos:
            raise CheckpointError(f"{path}: tensor {_name(cur.name)} starts at data byte "
                                  f"{cur.start - data_start}, leaving a gap after byte "
                                  f"{pos - data_start}")
        pos = cur.end
    if pos != size:
        raise CheckpointError(f"{path}: {size - pos} bytes after the last tensor (the data "
                              "region must end where the last tensor does)")
    return Header(path, {t.name: t for t in infos}, dict(meta), bytes(raw), size)


def build_header(entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix included) for tensors written back to back in `entries`
    order (name, safetensors dtype, shape); returns (prefix_and_header, [(begin, end)] relative
    to the data region). Metadata defaults to {"format": "pt"}; padded with spaces to 8 bytes."""
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    obj: dict = {"__metadata__": meta}
    offsets, pos = [], 0
    for name, dt, shape in entries:
        n = math.prod(shape) * DTYPES[dt][1]
        obj[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append((pos, pos + n))
        pos += n
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
