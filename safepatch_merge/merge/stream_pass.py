"""The merge's one streaming pass: every backbone tensor read, merged and written in order.

The reader and (on an accelerator) the uploader are the streaming context's
(:class:`.stream.EngineContext`); merged chunks go to the output builder's background writer
in backbone file order, each shard finished (fsynced, renamed, recorded for resume) as its
last tensor is written. On an accelerator, merged chunks come down through a ring of pinned
buffers (transfer.OutputRing) and reach the writer once their copy has finished.
"""
from __future__ import annotations

import functools
from collections import deque
from typing import Mapping, Sequence

from ..errors import SafepatchError
from ..io.reader import Part, item_bytes
from ..io.writer import OutputBuilder, ShardPlan
from ..io.safetensors_header import DTYPES
from . import transfer
from .methods import MergeMethod
from .stream import EngineContext, row_elems
from .value_checks import check_output as check_output_values


def stream_pass(ctx: EngineContext, method: MergeMethod, builder: OutputBuilder,
                shards: Sequence[ShardPlan], roles_of: Mapping[str, tuple[str, ...]],
                out_dt: Mapping[str, str], check_output: bool = True) -> tuple[int, int]:
    """The merge's one streaming pass: every backbone tensor, in shard order, read, merged on
    the engine's device (or copied as is) and handed to the writer in order. With
    `check_output`, every merged chunk is checked to be finite on the writer thread (see
    value_checks). Returns (bytes read, bytes written)."""
    base = ctx.ckpts["base"]
    items, meta = [], []  # meta: (shard index, name, offset, count, last chunk of shard)
    todo = [i for i, s in enumerate(shards) if s.filename not in builder.done]
    for si in todo:
        shard = shards[si]
        for ti, (name, _, _) in enumerate(shard.entries):
            info = base.tensors[name]
            row = row_elems(info.shape)
            roles = roles_of[name]
            chunks = ([(0, info.numel)] if roles and method.whole_tensor(name)
                      else ctx.chunks(info.numel, row))
            for ci, (off, cnt) in enumerate(chunks):
                parts = [Part("base", info, off, cnt)]
                parts += [Part(r, ctx.ckpts[r].tensors[name], off, cnt) for r in roles
                          if (r, name, off, cnt) not in ctx.cache]
                items.append(parts)
                last = ti == len(shard.entries) - 1 and ci == len(chunks) - 1
                meta.append((si, name, off, cnt, last))
    used = {(r, m[1], m[2], m[3]) for m in meta for r in roles_of[m[1]]}
    for key in [k for k in ctx.cache if k not in used]:  # e.g. shards a resume skips
        del ctx.cache[key]
    if not items:
        return 0, 0
    clock = ctx.clock
    ops = ctx.transfer
    pf, up, bar = ctx.open_stream(items, "merge")
    ring = None
    if ops is not None:
        out_bytes = max(m[3] * DTYPES[out_dt[m[1]]][1] for m in meta)
        ring = transfer.OutputRing(ops, out_bytes, 3)
    writer = None
    read = written = 0
    # In order, waiting for the writer: (copy-done event or None, host tensor, on_done, index).
    # A host slot or output buffer an entry holds is freed only after the writer wrote it.
    fifo: deque = deque()

    def hand_one() -> bool:
        """Give the oldest entry to the writer, first waiting for its download if it has
        one; False if there is none."""
        nonlocal writer, read, written
        if not fifo:
            return False
        ev, t, on_done, i = fifo.popleft()
        si, name, off, cnt, last = meta[i]
        if ev is not None:
            with clock("stream.d2h_wait"):
                ops.synchronize(ev)
        if writer is None:
            writer = builder.shard(shards[si])
        check = None
        if check_output and roles_of[name]:
            check = functools.partial(check_output_values, name, offset=off)
        with clock("stream.write_wait"):  # the writer's queue is bounded
            writer.write(t, on_done=on_done, check=check)
        nbytes = item_bytes(items[i])
        read += nbytes
        written += cnt * DTYPES[out_dt[name]][1]
        bar.update(nbytes)
        if last:
            with clock("stream.shard_finish"):  # drain, fsync, rename, manifest
                writer.finish()
            writer = None
        return True

    def hand_finished(holding_slots: bool) -> None:
        """Hand over entries whose copy is done; all of them when the reader may be waiting
        for a slot one of them holds."""
        while fifo and (holding_slots or fifo[0][0] is None or ops.query(fifo[0][0])):
            hand_one()

    it = iter(pf)
    try:
        while True:
            if up is not None:  # never hold the reader's slots while waiting on it
                with clock("stream.h2d_wait"):
                    up.release_finished(block=True)
                hand_finished(holding_slots=any(e[0] is None for e in fifo))
            with clock("stream.read_wait"):
                item = next(it, None)
            if item is None:
                break
            si, name, off, cnt, last = meta[item.index]
            info = base.tensors[name]
            dt = out_dt[name]
            if not roles_of[name] and dt == info.dtype:  # copied as is, straight from the slot
                fifo.append((None, item.views["base"], item.release, item.index))
                hand_finished(holding_slots=False)
                continue
            views = up.upload(item) if up is not None else item.views
            for r in roles_of[name]:
                if r not in views:  # kept on the device by the pre-pass; used once
                    views[r] = ctx.cache.pop((r, name, off, cnt))
            with clock("stream.compute"):
                if roles_of[name]:
                    out = method.merge_chunk(name, views, off, DTYPES[dt][0])
                else:
                    out = views["base"].to(DTYPES[dt][0])
                if out.dtype != DTYPES[dt][0] or out.numel() != cnt:
                    raise RuntimeError(f"method {method.name} returned {out.dtype} x "
                                       f"{out.numel()} for {name!r}, expected {DTYPES[dt][0]} "
                                       f"x {cnt}")
            if up is not None:
                host, ev, give_back = ring.download(out, hand_one)
                up.computed()  # after the download: it reads `out`, which may view the slot
                fifo.append((ev, host, give_back, item.index))
            else:
                if any(out.data_ptr() == v.data_ptr() for v in views.values()):
                    out = out.clone()  # never hand the writer a view of a reusable read slot
                item.release()
                fifo.append((None, out, None, item.index))
            del out, views
            hand_finished(holding_slots=False)
        while fifo:
            hand_one()
    except BaseException:
        if writer is not None:
            try:
                builder.thread.drain()
            except SafepatchError:
                pass
            writer.abort()
        raise
    finally:
        pf.close()
        bar.close()
        clock.add("stream.reader_busy", pf.busy_seconds)
    return read, written
