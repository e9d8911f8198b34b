"""Streaming under the memory budget: the context a method's pre-pass reads through.

:class:`EngineContext` holds the opened checkpoints, the device and the chunk size the engine
derived from ``--max-memory``, and streams chunks of tensors with read-ahead (a background
reader fills ``depth`` slots; on an accelerator each item goes up in one asynchronous copy).
The engine's own merge pass uses the same reader and uploader (:meth:`open_stream`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..cuda_streams import CudaOps
from ..io.checkpoint import Checkpoint
from ..io.reader import Part, Prefetcher, item_bytes
from . import transfer
from .stages import StageClock


class EngineContext:
    """What a method's pre-pass sees: opened checkpoints, device, work dir, and streaming."""

    def __init__(self, ckpts: dict[str, Checkpoint], device: torch.device, chunk_elems: int,
                 depth: int, work_dir: Path | None, progress: bool,
                 clock: StageClock | None = None, *, read_check: Callable | None = None,
                 transfer_ops: "CudaOps | None | str" = "auto",
                 cache_budget: int = 0):
        """ckpts: {role: opened checkpoint}, "base" the backbone. chunk_elems: elements per
        streamed chunk. depth: read slots. work_dir: where a pre-pass may cache results (None
        in a dry run). read_check: run on the reader thread for every part read
        (value_checks.score_reader_check). transfer_ops: the device's copy ops ("auto": from
        `device`; None: the host computes on the reader's views). cache_budget: bytes of
        pre-pass chunks that may stay on the accelerator for the merge pass."""
        self.ckpts, self.device, self.chunk_elems = ckpts, device, chunk_elems
        self.depth, self.work_dir, self.progress = depth, work_dir, progress
        self.clock = clock if clock is not None else StageClock()
        self.read_check = read_check
        self.transfer = transfer.ops_for(device) if transfer_ops == "auto" else transfer_ops
        self.cache_budget = cache_budget
        self.bytes_read = 0  # by stream_items
        # Chunks a pre-pass streamed to the accelerator and kept there for the merge pass, so
        # they are not read twice: {(role, name, offset, count): device tensor}.
        self.cache: dict[tuple[str, str, int, int], torch.Tensor] = {}
        self.cache_bytes = 0

    def keep(self, role: str, name: str, offset: int, chunk: torch.Tensor) -> None:
        """Keep a copy of this pre-pass chunk on the accelerator for the merge pass, if the
        budget allows (no-op on the CPU, where the reader maps the page cache instead)."""
        n = chunk.numel() * chunk.element_size()
        if self.transfer is None or self.cache_bytes + n > self.cache_budget:
            return
        key = (role, name, offset, chunk.numel())
        if key not in self.cache:
            self.cache[key] = chunk.clone()  # the chunk views a device slot that is reused
            self.cache_bytes += n

    def chunks(self, numel: int, row: int) -> list[tuple[int, int]]:
        """(offset, count) chunks of a tensor of `numel` elements with rows of `row` elements:
        whole rows per chunk where a row fits, else plain element ranges."""
        c = self.chunk_elems
        if 0 < row <= c:
            c = (c // row) * row
        if numel == 0:
            return [(0, 0)]
        return [(o, min(c, numel - o)) for o in range(0, numel, c)]

    def stream(self, role: str, names: list[str], fn: Callable[[str, torch.Tensor, int], None],
               desc: str = "") -> None:
        """Call fn(name, chunk, offset) for every chunk of tensors `names` of checkpoint `role`
        (chunk: 1-D, the checkpoint's dtype, on the engine's device), in the given order."""
        self.stream_entries([(role, n) for n in names],
                            lambda r, name, chunk, off: fn(name, chunk, off), desc)

    def stream_entries(self, entries: list[tuple[str, str]],
                       fn: Callable[[str, str, torch.Tensor, int], None], desc: str = "") -> None:
        """Call fn(role, name, chunk, offset) for every chunk of tensors (role, name), in order,
        with read-ahead under the engine's memory budget."""
        items, meta = [], []
        for role, name in entries:
            info = self.ckpts[role].tensors[name]
            row = row_elems(info.shape)
            for off, cnt in self.chunks(info.numel, row):
                items.append([Part(role, info, off, cnt)])
                meta.append((role, name, off))

        def call(i, views):
            role, name, off = meta[i]
            fn(role, name, views[role], off)

        self.stream_items(items, call, desc)

    def open_stream(self, items: list[list[Part]], desc: str):
        """(reader, Uploader or None, progress bar) for streaming `items` on the engine's
        device: mapped page-cache windows on the CPU; pinned slots, each uploaded in one
        copy, on an accelerator."""
        slot = max(item_bytes(p) for p in items)
        bar = progress_bar(sum(item_bytes(p) for p in items), desc, self.progress)
        ops = self.transfer
        pf = Prefetcher(items, slot, self.depth, pin=ops is not None and ops.pin,
                        zero_copy=None if ops is None else False, check=self.read_check)
        up = transfer.Uploader(ops, slot, self.depth) if ops is not None else None
        return pf, up, bar

    def stream_items(self, items: list[list[Part]],
                     fn: Callable[[int, dict[str, torch.Tensor]], None], desc: str = "") -> None:
        """Call fn(i, {part key: 1-D chunk on the engine's device}) for each work item i of
        `items` in order, with read-ahead. On an accelerator each item goes up in one
        asynchronous copy and fn's work is queued, not waited for; fn must not keep the
        chunks past its return (their device memory is reused)."""
        if not items:
            return
        pf, up, bar = self.open_stream(items, desc)
        it = iter(pf)
        clock, stage = self.clock, "prepass"  # the merge pass streams in engine.stream_pass
        try:
            while True:
                if up is not None:  # never hold the reader's slots while waiting on it
                    with clock(f"{stage}.h2d_wait"):
                        up.release_finished(block=True)
                with clock(f"{stage}.read_wait"):
                    item = next(it, None)
                if item is None:
                    break
                views = up.upload(item) if up is not None else item.views
                with clock(f"{stage}.compute"):
                    fn(item.index, views)
                if up is not None:
                    up.computed()
                else:
                    item.release()
                bar.update(item_bytes(items[item.index]))
        finally:
            pf.close()
            bar.close()
        clock.add(f"{stage}.reader_busy", pf.busy_seconds)
        self.bytes_read += pf.bytes_read


def progress_bar(total: int, desc: str, enabled: bool):
    """A byte-counting progress bar (disabled unless `enabled`)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, dynamic_ncols=True, leave=False)


def row_elems(shape) -> int:
    """Elements per row of a tensor of `shape` (1 for a vector or scalar)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1
