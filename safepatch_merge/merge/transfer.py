"""Host <-> device transfers of the streaming passes on an accelerator (CUDA).

The reader fills pinned host slots (one per work item, every part 64-byte aligned in it). On
the device there is a ring of as many slots: each item goes up in *one* asynchronous copy of
its slot's used bytes on a copy stream, the compute stream waits on an event, and the parts
are typed views into the device slot at the host offsets. A device slot is overwritten only
after the compute that read it (the copy stream waits on that compute's event); a host slot
goes back to the reader once its copy has finished. Merged chunks come down into a ring of
pinned output buffers, asynchronously, and reach the writer in order once their copy has
finished; the writer returns each buffer when its bytes are on disk.

So the host never waits on a copy it has just queued, nothing is allocated per chunk, and
the only host syncs left are the ones a method asks for (e.g. the finiteness check).

Every CUDA call goes through :class:`~safepatch_merge.cuda_streams.CudaOps`, so the tests
can run this module's ordering on the CPU with a fake whose copies happen as late as the
events allow (tests/test_transfer.py): a slot released or a buffer written too early then
shows up as wrong output bytes.
"""
from __future__ import annotations

import queue
from typing import Callable

import torch

from ..cuda_streams import ops_for  # noqa: F401 - the engine calls transfer.ops_for (tests fake it)
from ..io.reader import Item


class Uploader:
    """Puts reader items on the device: ``depth`` device slots of ``slot_bytes`` each.

    ``upload(item)`` returns the item's views on the device, ordered before any work queued
    next on the compute stream; call ``computed()`` once that work is queued (it guards the
    device slot), and ``release_finished(block)`` to hand finished host slots back to the
    reader (block=True before waiting on the reader, so it is never starved of slots).
    """

    def __init__(self, ops, slot_bytes: int, depth: int):
        self.ops = ops
        self.copy_stream = ops.new_stream()
        self.compute = ops.current_stream()
        self.slots = [ops.device_bytes(max(64, slot_bytes)) for _ in range(depth)]
        # The slots come from the compute stream's memory pool, where work queued earlier may
        # still use that memory: the copy stream starts after it.
        ops.wait(self.copy_stream, ops.record(self.compute))
        self.free_after = [None] * depth  # event after the last compute that read the slot
        self.next = 0
        self.current: int | None = None
        self.pending: list[tuple[object, Item]] = []  # (copy done, item) not yet released

    def upload(self, item: Item) -> dict[str, torch.Tensor]:
        raw, spec = item.raw, item.spec
        if raw is None:
            raise RuntimeError("an accelerator upload needs the item in a reader slot")
        k = self.next
        self.next = (k + 1) % len(self.slots)
        if self.free_after[k] is not None:
            self.ops.wait(self.copy_stream, self.free_after[k])
        dst = self.slots[k]
        self.ops.copy(dst[:raw.numel()], raw, self.copy_stream)
        done = self.ops.record(self.copy_stream)
        self.ops.wait(self.compute, done)
        self.pending.append((done, item))
        self.current = k
        return {key: dst[o:o + n].view(dt) for key, (o, n, dt) in spec.items()}

    def computed(self) -> None:
        """Mark the work queued since the last upload as the last reader of its slot."""
        if self.current is not None:
            self.free_after[self.current] = self.ops.record(self.compute)
            self.current = None

    def release_finished(self, block: bool = False) -> None:
        keep = []
        for ev, item in self.pending:
            if block:
                self.ops.synchronize(ev)
            if block or self.ops.query(ev):
                item.release()
            else:
                keep.append((ev, item))
        self.pending = keep


class OutputRing:
    """``count`` pinned host buffers of ``nbytes`` that device results are copied into."""

    def __init__(self, ops, nbytes: int, count: int):
        self.ops = ops
        self.compute = ops.current_stream()
        self.free: queue.Queue = queue.Queue()
        for _ in range(count):
            self.free.put(ops.pinned(max(64, nbytes)))

    def download(self, out: torch.Tensor, make_room: Callable[[], bool]):
        """Queue a copy of device tensor `out` into a free buffer on the compute stream.
        Returns (host view of out's dtype and size, copy-done event, give-back callable).
        While no buffer is free, ``make_room()`` is called (it hands finished work to the
        writer, which frees buffers; False when it has nothing left to hand over)."""
        buf = None
        while buf is None:
            try:
                buf = self.free.get_nowait()
            except queue.Empty:
                if not make_room():
                    buf = self.free.get()
        nb = out.numel() * out.element_size()
        host = buf[:nb].view(out.dtype)
        self.ops.copy(host, out.reshape(-1), self.compute)
        ev = self.ops.record(self.compute)
        return host, ev, lambda: self.free.put(buf)
