"""Stream tensor bytes off disk with read-ahead on a background thread, in bounded buffers.

A *work item* is a list of :class:`Part` s — byte ranges of tensors from any checkpoints —
that the consumer needs together (e.g. one chunk of the backbone, both patches and both
scores). The reader owns ``depth`` slot buffers, each large enough for the largest item; a
background thread fills slot after slot with ``os.preadv`` (which releases the GIL), and the
consumer gets each item's parts as typed tensor views into its slot. A slot is reused only
after the consumer releases it, so host memory is ``depth x max item bytes`` whatever the
model size. No file is memory-mapped (mapped pages count against the process's memory).
On CUDA the slots are pinned, so the consumer can copy them to the device asynchronously.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..errors import CheckpointError
from .checkpoint import load_pickle
from .safetensors_header import TensorInfo

_ALIGN = 64


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
    """One delivered work item: ``views`` {key: 1-D tensor of the part's dtype} in a slot."""

    def __init__(self, index: int, slot: int, views: dict[str, torch.Tensor], owner: "Prefetcher"):
        self.index, self.slot, self.views, self._owner = index, slot, views, owner

    def release(self) -> None:
        """Give the slot back to the reader (the views must no longer be used)."""
        if self.slot >= 0:
            self._owner._free.put(self.slot)
            self.slot = -1


class Prefetcher:
    """Background reader over `items` (a list of Part lists). Iterate to get :class:`Item` s in
    order; call ``item.release()`` when done with each. ``depth`` slots of ``slot_bytes``
    (>= the largest item) are allocated once; ``pin`` pins them (CUDA hosts).
    Errors in the reader thread (short reads) are raised in the consumer as CheckpointError.
    """

    def __init__(self, items: list[list[Part]], slot_bytes: int, depth: int = 2, pin: bool = False):
        self.items = items
        self.depth = max(1, depth)
        slot_bytes = max(_ALIGN, slot_bytes)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=pin)
                      for _ in range(self.depth)]
        self._np = [s.numpy() for s in self.slots]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(self.depth):
            self._free.put(i)
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._fds: dict = {}
        self._pickle_cache: tuple | None = None
        self.bytes_read = 0
        self._thread = threading.Thread(target=self._run, name="safepatch-reader", daemon=True)
        self._thread.start()

    # -- reader thread -------------------------------------------------------------------
    def _fd(self, path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        return fd

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

    def _run(self) -> None:
        try:
            for idx, parts in enumerate(self.items):
                slot = None
                while slot is None:
                    if self._stop.is_set():
                        return
                    try:
                        slot = self._free.get(timeout=0.1)
                    except queue.Empty:
                        pass
                buf, off, views = self._np[slot], 0, {}
                for part in parts:
                    n = part.nbytes
                    self._read_into(part, buf[off:off + n])
                    views[part.key] = (off, n, part.info.torch_dtype)
                    off += -(-n // _ALIGN) * _ALIGN
                self._ready.put((idx, slot, views))
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
            idx, slot, spec = got
            s = self.slots[slot]
            views = {k: s[o:o + n].view(dt) for k, (o, n, dt) in spec.items()}
            yield Item(idx, slot, views, self)

    def close(self) -> None:
        """Stop the reader thread (safe to call twice)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
