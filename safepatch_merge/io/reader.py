"""Stream tensor bytes off disk with read-ahead on a background thread, in bounded buffers.

A *work item* is a list of :class:`Part` s — byte ranges of tensors from any checkpoints —
that the consumer needs together (e.g. one chunk of the backbone, both patches and both
scores). The reader owns ``depth`` slot buffers, each large enough for the largest item; a
background thread fills slot after slot with ``os.preadv`` (which releases the GIL), and the
consumer gets each item's parts as typed tensor views into its slot. A slot is reused only
after the consumer releases it, so host memory is ``depth x max item bytes`` whatever the
model size. On CUDA the slots are pinned, so the consumer can copy them to the device
asynchronously.

On the CPU the reader maps instead of copying (``zero_copy``): each part of the next items is
a private read-only window of its file (``mmap`` of just that byte range), populated by the
background thread, and the consumer computes straight from the page cache. The window is
unmapped when the item is released, so mapped memory stays ``depth x max item bytes``, the
same bound as the slots (never a whole-file map, whose pages would all count against the
process). Copying into slots costs system time per byte (``preadv``), which on a machine with
few cores is taken from the merge itself; mapping costs a page-table entry per page. Parts that cannot be mapped as typed views
(pickles, offsets not aligned to the element size) are still copied.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..errors import CheckpointError
from .checkpoint import load_pickle
from .links import open_regular
from .safetensors_header import TensorInfo

_ALIGN = 64
_PAGE = mmap.ALLOCATIONGRANULARITY
# MADV_POPULATE_READ (Linux 5.14): fault the window's pages in on the reader thread; older
# kernels refuse it and get MADV_WILLNEED (read-ahead only) instead.
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _libc_madvise():
    """libc's madvise through ctypes, which releases the GIL for the call (mmap.madvise holds
    it: populating a 50 MB window stalled the consumer's torch calls on the GIL)."""
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


_MADVISE = _libc_madvise()


def _unmap(maps: list[mmap.mmap]) -> None:
    for m in maps:
        try:
            m.close()
        except BufferError:  # a view outlived its item: unmapped when the view is freed
            pass


def _populate(m: mmap.mmap) -> None:
    """Fault the window's pages in (read-ahead only where the kernel lacks POPULATE_READ)."""
    if _MADVISE is not None and len(m):
        ref = ctypes.c_char.from_buffer(m)  # an export of m: dropped before m can be closed
        addr = ctypes.addressof(ref)
        del ref
        if _MADVISE(addr, len(m), _POPULATE_READ) == 0:
            return
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_WILLNEED"):  # not on Windows
        m.madvise(mmap.MADV_WILLNEED)


@dataclass(frozen=True)
class Part:
    """Elements [elem_start, elem_start + elem_count) of tensor `info`, delivered under `key`."""

    key: str
    info: TensorInfo
    elem_start: int
    elem_count: int

    @property
    def nbytes(self) -> int:
        return self.elem_count * self.info.itemsize


def item_bytes(parts: Iterable[Part]) -> int:
    """Slot bytes an item needs (each part aligned to 64 bytes)."""
    return sum(-(-p.nbytes // _ALIGN) * _ALIGN for p in parts)


class Item:
    """One delivered work item: ``views`` {key: 1-D tensor of the part's dtype} in a slot (or
    in mapped windows of the files). Where every part is in the slot, ``raw`` is the slot's
    used bytes (uint8) and ``spec`` {key: (byte offset, bytes, dtype)} places the parts in
    it, so the item can be moved to a device in one copy; else both are None."""

    def __init__(self, index: int, slot: int, views: dict[str, torch.Tensor], owner: "Prefetcher",
                 maps: list[mmap.mmap] | None = None, raw: torch.Tensor | None = None,
                 spec: dict | None = None):
        self.index, self.slot, self.views, self._owner = index, slot, views, owner
        self._maps = maps or []
        self.raw, self.spec = raw, spec

    def release(self) -> None:
        """Give the slot back to the reader (the views must no longer be used)."""
        if self.slot >= 0:
            self.views, self.raw = {}, None
            # The reader thread unmaps the windows (munmap of a populated window is not free).
            self._owner._free.put((self.slot, self._maps))
            self._maps = []
            self.slot = -1


class Prefetcher:
    """Background reader over `items` (a list of Part lists). Iterate to get :class:`Item` s in
    order; call ``item.release()`` when done with each. ``depth`` slots of ``slot_bytes``
    (>= the largest item) are allocated once; ``pin`` pins them (CUDA hosts).
    ``zero_copy`` (default: when not pinning) delivers mapped windows of the files instead of
    slot copies; the slots are then allocated only if some part must be copied.
    Errors in the reader thread (short reads) are raised in the consumer as CheckpointError.
    ``check(part, chunk)``, if given, runs on the reader thread for every part once its bytes
    are in host memory (chunk: 1-D, the part's dtype; not to be kept); what it raises is
    raised in the consumer, in item order (e.g. value checks that should not cost the
    consumer's thread).
    """

    def __init__(self, items: list[list[Part]], slot_bytes: int, depth: int = 2, pin: bool = False,
                 zero_copy: bool | None = None, check: Callable | None = None):
        self.items = items
        self.check = check
        self.depth = max(1, depth)
        self.zero_copy = (not pin) if zero_copy is None else bool(zero_copy and not pin)
        slot_bytes = max(_ALIGN, slot_bytes)
        need_slots = not self.zero_copy or any(p.nbytes and not self._mappable(p)
                                               for it in items for p in it)
        self.slots = [torch.empty(slot_bytes if need_slots else _ALIGN, dtype=torch.uint8,
                                  pin_memory=pin) for _ in range(self.depth)]
        self._np = [s.numpy() for s in self.slots]
        self._free: queue.Queue[tuple[int, list]] = queue.Queue()  # (slot, windows to unmap)
        for i in range(self.depth):
            self._free.put((i, []))
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._fds: dict = {}
        self._pickle_cache: tuple | None = None
        self.bytes_read = 0
        self.busy_seconds = 0.0  # reader thread: time spent reading or mapping (not waiting)
        self._thread = threading.Thread(target=self._run, name="safepatch-reader", daemon=True)
        self._thread.start()

    # -- reader thread -------------------------------------------------------------------
    def _fd(self, path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = open_regular(path)  # never blocks on a FIFO swapped in since indexing
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        return fd

    @staticmethod
    def _mappable(part: Part) -> bool:
        info = part.info
        return info.start >= 0 and part.nbytes > 0 and \
            (info.start + part.elem_start * info.itemsize) % info.itemsize == 0

    def _map(self, part: Part) -> tuple[mmap.mmap, int]:
        """A populated private window over the part's bytes, and the part's offset in it."""
        info = part.info
        fd = self._fd(info.path)
        pos = info.start + part.elem_start * info.itemsize
        end = pos + part.nbytes
        if os.fstat(fd).st_size < end:  # a mapped page past EOF would be SIGBUS, not an error
            raise CheckpointError(f"{info.path}: tensor {info.name!r} is truncated (file ends "
                                  f"before byte {end})")
        base = pos - pos % _PAGE
        m = mmap.mmap(fd, end - base, offset=base, access=mmap.ACCESS_COPY)
        _populate(m)
        self.bytes_read += part.nbytes
        return m, pos - base

    def _read_into(self, part: Part, dst) -> None:
        info = part.info
        if info.start < 0:  # pickle checkpoint: bytes from torch.load(weights_only=True)
            if self._pickle_cache is None or self._pickle_cache[0] != info.path:
                self._pickle_cache = (info.path, load_pickle(info.path))
            t = self._pickle_cache[1][info.name].contiguous().reshape(-1)
            src = t[part.elem_start:part.elem_start + part.elem_count].view(torch.uint8)
            dst[:] = src.numpy()
            return
        fd = self._fd(info.path)
        pos = info.start + part.elem_start * info.itemsize
        mv = memoryview(dst)
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], pos + done)
            if n <= 0:
                raise CheckpointError(f"{info.path}: tensor {info.name!r} is truncated (short "
                                      f"read at byte {pos + done})")
            done += n
        self.bytes_read += done

    def _check(self, part: Part, raw: torch.Tensor) -> None:
        """Run the check on the part's bytes; the view is dropped before the window can be
        unmapped (a live export would keep the mapping)."""
        try:
            self.check(part, raw.view(part.info.torch_dtype))
        finally:
            del raw

    def _run(self) -> None:
        try:
            for idx, parts in enumerate(self.items):
                slot = None
                while slot is None:
                    if self._stop.is_set():
                        return
                    try:
                        slot, done = self._free.get(timeout=0.1)
                        _unmap(done)
                    except queue.Empty:
                        pass
                t0 = time.perf_counter()
                buf, off, views, maps = self._np[slot], 0, {}, []
                for part in parts:
                    n = part.nbytes
                    if self.zero_copy and self._mappable(part):
                        m, o = self._map(part)
                        maps.append(m)
                        views[part.key] = (len(maps) - 1, o, n, part.info.torch_dtype)
                        if self.check is not None and n:
                            self._check(part, torch.frombuffer(m, dtype=torch.uint8, count=n,
                                                               offset=o))
                        continue
                    self._read_into(part, buf[off:off + n])
                    views[part.key] = (-1, off, n, part.info.torch_dtype)
                    if self.check is not None and n:
                        self._check(part, self.slots[slot][off:off + n])
                    off += -(-n // _ALIGN) * _ALIGN
                self.busy_seconds += time.perf_counter() - t0
                self._ready.put((idx, slot, views, maps))
            self._ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._ready.put(e)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._pickle_cache = None

    # -- consumer -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Item]:
        while True:
            got = self._ready.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                if isinstance(got, OSError):
                    raise CheckpointError(f"{getattr(got, 'filename', '')}: read failed "
                                          f"({got.strerror or got})") from None
                raise got
            idx, slot, spec, maps = got
            # Views hold a memoryview export of their window (torch keeps the object it was
            # given), so a view kept past release() makes the unmap fail softly (BufferError)
            # and the window lives until the view is freed, never a dangling pointer.
            s = self.slots[slot]
            views = {k: (s[o:o + n] if mi < 0 else
                         torch.frombuffer(memoryview(maps[mi]), dtype=torch.uint8, count=n,
                                          offset=o)).view(dt)
                     for k, (mi, o, n, dt) in spec.items()}
            raw = placed = None
            if not maps:
                placed = {k: (o, n, dt) for k, (mi, o, n, dt) in spec.items()}
                raw = s[:max((o + n for o, n, _ in placed.values()), default=0)]
            yield Item(idx, slot, views, self, maps, raw, placed)

    def close(self) -> None:
        """Stop the reader thread (safe to call twice)."""
        self._stop.set()
        self._thread.join(timeout=10)
        while True:
            try:
                _unmap(self._free.get_nowait()[1])
            except queue.Empty:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
