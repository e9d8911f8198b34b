"""Parse, validate and build safetensors headers without loading any tensor data.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length
N, N bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}, then the data region; offsets are relative to the data region.

Reading is lenient where safetensors itself is (tensor order), strict where a bad file could
make us read garbage: every range must lie inside the file, match dtype x shape, and not
overlap another. Writing follows what safetensors and transformers accept: offsets contiguous
from 0 and covering the data exactly, ``__metadata__ = {"format": "pt"}``, header padded with
spaces to a multiple of 8 bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

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


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of safetensors file `path`.

    Raises CheckpointError naming the file (and tensor) when the file is truncated, the header
    is oversized or not JSON, a dtype is unknown, a shape is invalid, or a tensor's byte range
    lies outside the file, disagrees with dtype x shape, or overlaps another tensor.
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, "
                                      "no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header length {n} "
                                      f"(file has {size} bytes; limit {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start, data_len = 8 + n, size - 8 - n
    infos = []
    for name, ent in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(ent, dict) or set(ent) - {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: corrupt header entry")
        dt, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        if dt not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dt!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CheckpointError(f"{where}: invalid data_offsets {offs!r}")
        b, e = offs
        if not 0 <= b <= e:
            raise CheckpointError(f"{where}: invalid data_offsets {offs!r}")
        if e > data_len:
            raise CheckpointError(f"{where}: data ends at byte {data_start + e} but the file has "
                                  f"{size} bytes (truncated shard?)")
        want = math.prod(shape) * DTYPES[dt][1]
        if e - b != want:
            raise CheckpointError(f"{where}: {e - b} data bytes but dtype {dt} x shape "
                                  f"{tuple(shape)} needs {want}")
        infos.append(TensorInfo(name, path, dt, tuple(shape), data_start + b, data_start + e))
    infos.sort(key=lambda t: (t.start, t.end))
    for prev, cur in zip(infos, infos[1:]):
        if cur.start < prev.end and cur.nbytes and prev.nbytes:
            raise CheckpointError(f"{path}: tensors {prev.name!r} and {cur.name!r} overlap")
    return Header(path, {t.name: t for t in infos}, {str(k): str(v) for k, v in meta.items()},
                  bytes(raw), size)


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
