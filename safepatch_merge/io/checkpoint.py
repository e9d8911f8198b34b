"""Index a checkpoint directory (or Hub id) by its safetensors headers, and validate it.

A checkpoint is a directory holding ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (HF format ``{"metadata": ..., "weight_map": {name: file}}``),
or — only when explicitly allowed — pickle files (``pytorch_model.bin`` or its index), which
are then loaded with ``torch.load(weights_only=True)``. Nothing is read beyond headers here;
:mod:`.reader` streams the bytes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, clip
from . import safe_json
from .links import UntrustedLinkError, open_regular, trusted_target
from .safetensors_header import TORCH_TO_ST, Header, TensorInfo, read_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
HISTOGRAMS_FILE = "histograms.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MAX_INDEX_BYTES = 256 << 20  # an index names each tensor once: far below this


@dataclass
class Checkpoint:
    """Tensors of one checkpoint. tensors: {name: TensorInfo} in streaming order (shard by
    shard in index order, file offset order inside a shard). For pickle checkpoints
    TensorInfo.start == -1 and the bytes come from torch.load(weights_only=True)."""

    role: str
    source: str
    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    headers: dict[Path, Header] = field(default_factory=dict)
    is_pickle: bool = False

    def describe(self) -> str:
        return f"{self.role} {self.source}"

    def identity(self, content_sha256: dict[Path, str] | None = None) -> list[dict]:
        """Per file: name, size and sha256 of the header (cheap, deterministic); for a file
        in huggingface_hub's cache, the sha256 the Hub names its blob by (``hub_sha256``,
        LFS files); and the content sha256 where `content_sha256` has it (ContentHasher)."""
        import hashlib

        out = []
        for f in self.files:
            h = self.headers.get(f)
            digest = hashlib.sha256(h.header_bytes).hexdigest() if h else None
            rec = {"file": f.name, "size": f.stat().st_size, "header_sha256": digest}
            blob = f.resolve()
            if f.is_symlink() and blob.parent.name == "blobs" and _SHA256.match(blob.name):
                rec["hub_sha256"] = blob.name
            if content_sha256 and f in content_sha256:
                rec["sha256"] = content_sha256[f]
            out.append(rec)
        return out

    def stat_identity(self) -> list[list]:
        """Per file: [name, size, mtime_ns, inode, header sha256] of the file a link points
        to — cheap, and changed by any rewrite that does not also restore the inode and
        mtime (``output.hash_inputs`` adds the content hash for those)."""
        import hashlib

        out = []
        for f in self.files:
            st = os.stat(f)
            h = self.headers.get(f)
            out.append([f.name, st.st_size, st.st_mtime_ns, st.st_ino,
                        hashlib.sha256(h.header_bytes).hexdigest() if h else None])
        return out

    def member(self, name: str) -> Path | None:
        """Path of file `name` of this checkpoint's directory (e.g. histograms.safetensors),
        None if absent; refused (CheckpointError) if the link rule does not trust it."""
        p = self.root / name
        if not os.path.lexists(p):
            return None
        trusted_target(p, self.root)
        return p

    def hub_commit(self) -> str | None:
        """The Hub commit of a checkpoint resolved through huggingface_hub's cache."""
        if self.root.parent.name == "snapshots" and _COMMIT.match(self.root.name):
            return self.root.name
        return None


class ContentHasher:
    """sha256 of whole files on a background daemon thread (hashlib and file reads release
    the GIL, so it overlaps a merge), for ``output.hash_inputs``. ``result()`` waits and
    returns {path: hex digest}; ``cancel()`` stops it between blocks (a failed merge)."""

    def __init__(self, files: list[Path], block: int = 1 << 22):
        import threading

        self.files, self.block = list(dict.fromkeys(files)), block
        self.digests: dict[Path, str] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="safepatch-input-hash", daemon=True)
        self._t.start()

    def _run(self) -> None:
        from .hashing import file_sha256

        try:
            for f in self.files:
                digest = file_sha256(f, self.block, self._stop)
                if digest is None:  # cancelled
                    return
                self.digests[f] = digest
        except OSError as e:
            self.error = e

    def finished(self) -> bool:
        """True once every file is hashed (without error)."""
        return not self._t.is_alive() and self.error is None and \
            len(self.digests) == len(self.files)

    def result(self) -> dict[Path, str]:
        self._t.join()
        if self.error is not None:
            raise CheckpointError(f"hashing the inputs failed: {self.error}")
        return self.digests

    def cancel(self) -> None:
        self._stop.set()


def resolve_source(source: str, role: str, revision: str | None = None,
                   allow_hub: bool = True, hint: str | None = None) -> Path:
    """Local directory for `source`: a path, or a Hub id resolved through huggingface_hub's
    cache (see :mod:`.hub`). Raises CheckpointError naming `role` and `source` (and `hint`:
    where else a relative path was looked for)."""
    p = Path(os.path.expanduser(str(source)))
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{role} {source}: not a directory (give the model directory)")
    if allow_hub and _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
        from .hub import snapshot

        return snapshot(str(source), role, revision, hint)
    raise CheckpointError(f"{role} {source}: {hint or 'no such directory'}")


def read_index(path: Path) -> dict[str, str]:
    """{tensor name: shard file name} of index file `path` (``{"weight_map": {...}}``).
    Raises CheckpointError naming the file for unreadable or non-JSON text (JSON read as
    safetensors reads headers: no NaN, bounded nesting and numbers), a key given twice
    anywhere (a tensor listed twice included), a missing weight_map, or a shard that is not
    a non-empty string."""
    try:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable index ({e.strerror or e})") from None
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{path}: index larger than {MAX_INDEX_BYTES} bytes")
    try:
        obj = safe_json.loads(raw)
    except safe_json.JSONError as e:
        raise CheckpointError(f"{path}: unreadable index ({e})") from None
    dup = safe_json.first_duplicate(obj)
    if dup is not None:  # which of the two would count is anyone's guess
        raise CheckpointError(f"{path}: key {clip(dup, 200)} is given twice")
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict):
        raise CheckpointError(f"{path}: index has no valid weight_map (an object of tensor "
                              "name: shard file)")
    for name, rel in wm.items():
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{path}: shard of tensor {clip(name, 200)} is "
                                  f"{clip(rel, 60)}, not a file name")
    return dict(wm)


def _shard_paths(root: Path, index: Path, wm: dict[str, str]) -> dict[str, Path]:
    """{tensor: path of its shard in `root`}, every shard a regular file the link rule
    (.links) trusts; refusals name the index, the shard and a tensor."""
    out: dict[str, Path] = {}
    seen: dict[str, Path] = {}
    for name, rel in wm.items():
        if rel not in seen:
            what = f"{index}: shard {clip(rel, 200)} of tensor {clip(name, 200)}"
            if os.path.isabs(rel):
                raise UntrustedLinkError(f"{what} is an absolute path, outside {root}")
            trusted_target(root / rel, root, what=what)
            seen[rel] = Path(os.path.normpath(root / rel))
        out[name] = seen[rel]
    return out


def open_checkpoint(source: str, role: str, *, revision: str | None = None,
                    allow_pickle: bool = False, exclude_files: tuple[str, ...] = (HISTOGRAMS_FILE,),
                    hint: str | None = None, pickle_opt_in: str = "set allow_pickle: true"
                    ) -> Checkpoint:
    """Index and validate checkpoint `source` (directory or Hub id); `role` names it in errors
    (e.g. "backbone", "patch_se", "scores_se"). Pickle checkpoints are refused unless
    allow_pickle (the refusal names `pickle_opt_in`, the caller's way to allow them). `hint`:
    where a missing relative path was looked for (for the error).
    Raises CheckpointError with a one-line message naming the file/tensor."""
    root = resolve_source(source, role, revision, hint=hint)
    index = root / SAFETENSORS_INDEX
    if os.path.lexists(index):
        trusted_target(index, root)
        wm = _shard_paths(root, index, read_index(index))
        return _from_safetensors(role, source, root, wm, index=index)
    singles = sorted(p for p in root.glob("*.safetensors") if p.name not in exclude_files)
    if os.path.lexists(root / "model.safetensors"):
        singles = [root / "model.safetensors"]
    if len(singles) == 1:
        trusted_target(singles[0], root)
        return _from_safetensors(role, source, root, None, singles[0])
    if len(singles) > 1:
        raise CheckpointError(f"{role} {source}: several .safetensors files but no "
                              f"{SAFETENSORS_INDEX}")
    pickles = os.path.lexists(root / PICKLE_INDEX) or os.path.lexists(root / "pytorch_model.bin")
    if pickles:
        if not allow_pickle:
            raise CheckpointError(f"{role} {source}: pickle checkpoint (pytorch_model.bin) refused; "
                                  f"convert it to safetensors or {pickle_opt_in} to load it "
                                  "with torch.load(weights_only=True)")
        return _from_pickle(role, source, root)
    raise CheckpointError(f"{role} {source}: no model.safetensors, {SAFETENSORS_INDEX} or "
                          "pytorch_model.bin found")


def _from_safetensors(role, source, root, weight_map, single=None, *, index=None
                      ) -> Checkpoint:
    files = list(dict.fromkeys(weight_map.values())) if weight_map is not None else [single]
    headers = {f: read_header(f) for f in files}
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in headers[f].tensors.items():
            if weight_map is not None and weight_map.get(name) != f:
                if name not in weight_map:
                    raise CheckpointError(f"{f}: tensor {clip(name, 200)} is in this shard but "
                                          f"not in the index {index}")
                continue  # a stale copy the index does not point to
            tensors[name] = info
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{f}: tensor {clip(name, 200)} listed in the index is "
                                      "missing from the shard")
    return Checkpoint(role, str(source), root, files, tensors, headers)


def _from_pickle(role, source, root) -> Checkpoint:
    if os.path.lexists(root / PICKLE_INDEX):
        trusted_target(root / PICKLE_INDEX, root)
        wm = _shard_paths(root, root / PICKLE_INDEX, read_index(root / PICKLE_INDEX))
        files = list(dict.fromkeys(wm.values()))
    else:
        trusted_target(root / "pytorch_model.bin", root)
        files = [root / "pytorch_model.bin"]
    tensors = {}
    for f in files:
        sd = load_pickle(f)
        for name, t in sd.items():
            dt = TORCH_TO_ST.get(t.dtype)
            if dt is None:
                raise CheckpointError(f"{f}: tensor {name!r} has unsupported dtype {t.dtype}")
            nbytes = t.numel() * t.element_size()
            tensors[name] = TensorInfo(name, f, dt, tuple(t.shape), -1, nbytes - 1)
        del sd
    return Checkpoint(role, str(source), root, files, tensors, {}, is_pickle=True)


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a pickle checkpoint file (memory-mapped when possible)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise CheckpointError(f"{path}: cannot load pickle checkpoint with weights_only=True "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: pickle checkpoint is not a flat {{name: tensor}} dict")
    return sd
