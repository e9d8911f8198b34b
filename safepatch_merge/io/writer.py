"""Stream an output checkpoint to disk: header first, then tensor bytes; atomic, resumable.

The output is built in ``OUT.partial/`` next to OUT. Each shard is written as
``NAME.inprogress`` (header first — every tensor's shape and dtype is known in advance — then
the tensors' bytes in header order, hashed on the way), fsynced, renamed to NAME, and recorded
with its size and sha256 in ``.safepatch_manifest.json`` (rewritten atomically). ``resume``
keeps the recorded shards whose bytes still match and redoes the rest; a manifest made by a
different plan (config or inputs changed) is refused. Only when every file is in place is
``OUT.partial`` renamed to OUT, so nothing at OUT is ever half-written.
Writes go through a background thread (bounded queue) so disk and compute overlap.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SafepatchError
from .atomic import write_atomic
from .hashing import file_sha256
from .safetensors_header import DTYPES, build_header

MANIFEST = ".safepatch_manifest.json"
WORK_DIR = ".safepatch_work"


class OutputError(SafepatchError):
    """The output path exists, is in use by another plan, or cannot be written."""


@dataclass
class ShardPlan:
    """One output shard: file name and its tensors (name, safetensors dtype, shape) in order."""

    filename: str
    entries: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(math.prod(s) * DTYPES[d][1] for _, d, s in self.entries)


def plan_shards(entries: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int
                ) -> list[ShardPlan]:
    """Split tensors (in order) into shards of at most max_shard_bytes of data (a tensor larger
    than that gets a shard of its own), named like transformers names them."""
    shards: list[ShardPlan] = []
    cur, size = ShardPlan(""), 0
    for e in entries:
        n = math.prod(e[2]) * DTYPES[e[1]][1]
        if cur.entries and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = ShardPlan(""), 0
        cur.entries.append(e)
        size += n
    if cur.entries or not shards:
        shards.append(cur)
    if len(shards) == 1:
        shards[0].filename = "model.safetensors"
    else:
        for i, s in enumerate(shards):
            s.filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def index_json(shards: list[ShardPlan], metadata: dict | None = None) -> bytes:
    """model.safetensors.index.json for a sharded plan (total_size = data bytes)."""
    meta = {"total_size": sum(s.data_bytes for s in shards)}
    meta.update(metadata or {})
    wm = {name: s.filename for s in shards for name, _, _ in s.entries}
    return (json.dumps({"metadata": meta, "weight_map": dict(sorted(wm.items()))}, indent=2)
            + "\n").encode()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




class _WriteThread:
    """Runs queued (fileobj, hasher, bytes) writes in order on one thread."""

    def __init__(self, max_queued: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=max_queued)
        self.error: BaseException | None = None
        self.busy_seconds = 0.0  # time spent writing (and waiting for the hash of) queued bytes
        self.t = threading.Thread(target=self._run, name="safepatch-writer", daemon=True)
        self.t.start()
        # one thread, so a shard's chunks are hashed in order
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="safepatch-hash")

    def hash(self, h, data) -> Future:
        """Queue h.update(data) on the hasher thread (in submission order)."""
        return self._hasher.submit(h.update, data)

    def _run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                if self.error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - reported by check()
                self.error = e
            finally:
                self.busy_seconds += time.perf_counter() - t0
                self.q.task_done()

    def submit(self, job) -> None:
        self.check()
        self.q.put(job)

    def drain(self) -> None:
        self.q.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            if isinstance(e, SafepatchError):  # a check a job ran (ShardWriter.write)
                raise e
            raise OutputError(f"writing the output failed: {e}") from e

    def close(self):
        self.q.put(None)
        self.t.join(timeout=30)
        self._hasher.shutdown(wait=True)


class ShardWriter:
    """Writes one shard: header already on disk; call :meth:`write` with each tensor's bytes in
    header order (possibly in chunks), then :meth:`finish`."""

    def __init__(self, builder: "OutputBuilder", shard: ShardPlan):
        self.b, self.shard = builder, shard
        self.final = builder.partial / shard.filename
        self.tmp = builder.partial / (shard.filename + ".inprogress")
        header, _ = build_header(shard.entries)
        self.expected = len(header) + shard.data_bytes
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.written = 0
        self._put(header)

    def _put(self, data, on_done=None, before=None) -> None:
        def job(data=data):
            try:
                if before is not None:
                    before()
                mv = memoryview(data).cast("B")
                # hash on the hasher thread while this one writes (both release the GIL for
                # large buffers), so hashing and writing overlap instead of adding up on the
                # writer, which is the critical path of a merge with cheap compute
                hashed = self.b.thread.hash(self.h, mv)
                self.f.write(mv)
                hashed.result()
                self.written += len(mv)
            finally:
                if on_done is not None:
                    on_done()
        self.b.thread.submit(job)

    def write(self, t: torch.Tensor, on_done=None, check=None) -> None:
        """Queue tensor (or chunk) `t`'s bytes (CPU, contiguous, not modified until written);
        `on_done()` runs on the writer thread once the bytes are written (e.g. to free a
        reader slot that `t` views). `check(t)` runs on the writer thread first; what it
        raises (a SafepatchError) stops the writing and is raised by the next write or
        finish, so a shard with a failed check is never recorded."""
        t = t.detach().contiguous().reshape(-1)
        self._put(t.view(torch.uint8).numpy() if t.numel() else b"", on_done,
                  None if check is None else functools.partial(check, t))

    def finish(self) -> None:
        self.b.thread.drain()
        if self.written != self.expected:
            raise OutputError(f"{self.tmp}: wrote {self.written} bytes, expected {self.expected}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.b.partial)
        self.b._record(self.shard.filename, self.expected, self.h.hexdigest())

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


class OutputBuilder:
    """The ``OUT.partial`` directory of one merge.

    out: final output directory. plan_id: a digest of everything that determines the bytes
    (config, inputs); a partial directory made under another plan_id is never resumed.
    """

    def __init__(self, out: str | Path, plan_id: str, *, resume: bool = False,
                 overwrite: bool = False):
        self.out = Path(out)
        self._named = bool(str(out).strip()) and self.out.name not in ("", ".", "..")
        self.partial = self.out.with_name(self.out.name + ".partial") if self._named else None
        self.plan_id, self.resume, self.overwrite = plan_id, resume, overwrite
        self.done: dict[str, dict] = {}
        self.thread: _WriteThread | None = None
        # extra manifest fields, read back on resume (e.g. the inputs' content hashes)
        self.meta: dict = {}
        self.meta_provider = None  # callable -> dict merged into meta at each manifest write

    def check_target(self) -> None:
        """Refuse, before any work: an OUT that names no directory ('.', '..', '' or '/'), an
        existing OUT without overwrite, an OUT.partial that is a link or was not made by this
        builder (no manifest of ours; an empty directory counts as ours), an unrelated
        OUT.partial without resume/overwrite, and an output parent that cannot be written."""
        if not self._named:
            raise OutputError(f"output directory {str(self.out)!r} names no directory of its own "
                              "(give a new directory's name, not '.', '..', '/' or empty)")
        if self.out.exists() and not self.overwrite:
            raise OutputError(f"{self.out} already exists; pass --overwrite to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out} exists and is not a directory")
        p = self.partial
        if p.is_symlink():
            raise OutputError(f"{p} is a symbolic link; refusing to build the output through it "
                              "(remove the link)")
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"{p} exists and is not a directory")
            if not (self.resume or self.overwrite):
                raise OutputError(f"{p} exists (an interrupted merge); pass --resume to "
                                  "continue it or --overwrite to start over")
            if self._foreign():
                raise OutputError(f"{p} exists but was not made by safepatch merge (no manifest "
                                  f"{MANIFEST} in it); remove it or choose another output")
        anc = self.out.absolute().parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise OutputError(f"cannot create {p}: {anc} is not a directory")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(f"cannot create {p}: {anc} is not writable")

    def _foreign(self) -> bool:
        """True if OUT.partial holds files but no manifest this builder wrote."""
        m = self.partial / MANIFEST
        if m.is_symlink() or not m.is_file():
            return any(self.partial.iterdir())
        try:
            doc = json.loads(m.read_bytes())
        except (OSError, ValueError):
            return True
        return not (isinstance(doc, dict) and isinstance(doc.get("plan_id"), str))

    def open(self) -> None:
        """Create or resume OUT.partial; afterwards :attr:`done` lists the shards to skip."""
        self.check_target()
        try:
            if self.partial.exists() and self.resume:
                self._load_manifest()
            elif self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True, exist_ok=True)
            (self.partial / WORK_DIR).mkdir(exist_ok=True)
            for pat in ("*.inprogress", "*.tmp", f"{WORK_DIR}/*.tmp"):  # a killed run's
                for p in self.partial.glob(pat):
                    p.unlink()
            self._write_manifest()
            fsync_dir(self.partial.parent)
        except OSError as e:
            raise OutputError(f"cannot create {self.partial} ({e.strerror or e})") from None
        self.thread = _WriteThread()

    @property
    def work_dir(self) -> Path:
        """Scratch space inside OUT.partial (histogram/threshold caches); removed at finish."""
        return self.partial / WORK_DIR

    def _load_manifest(self) -> None:
        try:  # absent only in an empty directory (check_target refused the rest)
            m = json.loads((self.partial / MANIFEST).read_text())
        except (OSError, ValueError):
            m = {}
        if m and m.get("plan_id") != self.plan_id:
            raise OutputError(f"{self.partial} was made by a different merge (config or inputs "
                              "changed); pass --overwrite to start over")
        shards = m.get("shards") if isinstance(m.get("shards"), dict) else {}
        for name, rec in shards.items():
            p = self.partial / name
            if not isinstance(rec, dict) or os.sep in name or name.startswith("."):
                continue
            if p.is_file() and not p.is_symlink() and p.stat().st_size == rec.get("size") \
                    and file_sha256(p) == rec.get("sha256"):
                self.done[name] = rec
            elif p.exists() or p.is_symlink():
                p.unlink()
        self.meta = {k: v for k, v in m.items() if k not in ("plan_id", "shards")}

    def set_meta(self, key: str, value) -> None:
        """Record an extra manifest field (read back into :attr:`meta` on resume)."""
        self.meta[key] = value
        self._write_manifest()

    def discard_done(self) -> None:
        """Forget (and delete) the finished shards of a resumed partial directory."""
        for name in self.done:
            (self.partial / name).unlink(missing_ok=True)
        self.done = {}
        self._write_manifest()

    def _write_manifest(self) -> None:
        if self.meta_provider is not None:
            self.meta.update(self.meta_provider())
        doc = {**self.meta, "plan_id": self.plan_id, "shards": self.done}
        write_atomic(self.partial / MANIFEST,
                          json.dumps(doc, indent=1, sort_keys=True).encode())

    def _record(self, filename: str, size: int, sha: str) -> None:
        self.done[filename] = {"size": size, "sha256": sha}
        self._write_manifest()

    def shard(self, shard: ShardPlan) -> ShardWriter:
        return ShardWriter(self, shard)

    def add_file(self, name: str, data: bytes) -> None:
        """Write a small complete file (index, config, card) into OUT.partial, fsynced."""
        write_atomic(self.partial / name, data)

    def copy_file(self, src: Path, name: str | None = None) -> None:
        dst = self.partial / (name or src.name)
        shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())

    def finish(self) -> Path:
        """Remove scratch files, fsync, and rename OUT.partial to OUT (replacing OUT if
        overwrite). Returns OUT."""
        if self.thread is not None:
            self.thread.drain()
            self.thread.close()
            self.thread = None
        shutil.rmtree(self.work_dir, ignore_errors=True)
        (self.partial / MANIFEST).unlink(missing_ok=True)
        fsync_dir(self.partial)
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise OutputError(f"{self.out} already exists; pass --overwrite to replace it")
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        fsync_dir(self.out.parent)
        if old is not None:
            if old.is_symlink():  # the link is replaced, never what it points to
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abandon(self) -> None:
        """Delete OUT.partial (after an input error that a resume could not fix)."""
        if self.thread is not None:
            self.thread.close()
            self.thread = None
        shutil.rmtree(self.partial, ignore_errors=True)

    def close_thread(self) -> None:
        if self.thread is not None:
            self.thread.close()
            self.thread = None
