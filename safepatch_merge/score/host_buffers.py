"""SNIP score buffers in host memory, fed from the accelerator (``--score-buffers host``).

On a GPU the fp32 score buffers are twice the size of bf16 gradients and live through every
batch's activations, so scoring with them on the device peaks above keeping a batch's
gradients (SmolLM2-135M, batch 8 × 512, H200: 6363 vs 6331 MB). Here the buffers, and a host
copy of θ, live in host memory instead; the device holds the model, the activations and the
gradients whose copies are in flight.

Each hook hands its gradient to :meth:`HostScoreBuffers.add`. It goes down in chunks of at
most ``slot_bytes`` into a ring of pinned staging slots, on a copy stream that starts after
the gradient was made; the gradient's memory is kept from reuse until its copies have run.
A worker thread waits for each chunk's copy, adds its share into the host buffer (the same
saliency op, on the CPU) and gives the slot back. The autograd thread waits only when every
slot is in flight, which bounds the gradient bytes in flight to the ring's size.

Costs: host memory for the fp32 buffers plus θ in its own dtype (6 bytes per bf16
parameter), one device-to-host copy of every gradient per batch, and the CPU's add. It is
correct on a CPU model too (copies are plain there), where it saves nothing.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from .. import cuda_streams

SLOT_BYTES = 64 << 20
SLOTS = 4

# accumulate(name, score, weight, grad, scale): add one chunk's share into `score`; the three
# tensors are 1-D contiguous views of equal length on the host
Accumulate = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class HostScoreBuffers:
    """fp32 score buffers in host memory for `params`, filled by a worker thread.

    params: {name: parameter}, on one device. accumulate: adds a chunk's contribution (runs on
    the worker thread). slot_bytes, slots: the pinned staging ring (bytes per slot, count;
    default SLOT_BYTES, SLOTS).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], accumulate: Accumulate,
                 slot_bytes: int | None = None, slots: int | None = None):
        slot_bytes = SLOT_BYTES if slot_bytes is None else slot_bytes
        slots = SLOTS if slots is None else slots
        if slot_bytes < 64 or slots < 1:
            raise ValueError("slot_bytes must be >= 64 and slots >= 1")
        self.params, self.accumulate = params, accumulate
        device = next(iter(params.values())).device
        self.ops = cuda_streams.ops_for(device)
        # θ does not change while scoring: one host copy, read by every batch's adds
        self.theta = {n: p.detach().to("cpu").contiguous() for n, p in params.items()}
        self.scores: dict[str, torch.Tensor] = {}
        self.slot_bytes = slot_bytes
        if self.ops is not None:
            self.slots = [self.ops.pinned(slot_bytes) for _ in range(slots)]
            self.compute = self.ops.current_stream()
            self.copy_stream = self.ops.new_stream()
        else:
            self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.free: queue.Queue = queue.Queue()
        for k in range(slots):
            self.free.put(k)
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.wait_s = 0.0  # autograd thread blocked on a free slot
        self.busy_s = 0.0  # worker thread waiting for copies and adding
        self.thread = threading.Thread(target=self._run, name="safepatch-score-host", daemon=True)
        self.thread.start()

    def add(self, name: str, grad: torch.Tensor, scale: float) -> None:
        """Queue `scale`·(θ ⊙ grad) of parameter `name` into its host buffer (in a hook).
        grad: the parameter's gradient (its shape, any float dtype), contiguous; the caller
        may drop it at once."""
        self._check()
        flat = grad.reshape(-1)
        es = flat.element_size()
        per = max(1, self.slot_bytes // es)
        if self.ops is not None:
            self.ops.wait(self.copy_stream, self.ops.record(self.compute))
            self.ops.retain(flat, self.copy_stream)
        for a in range(0, flat.numel(), per):
            b = min(flat.numel(), a + per)
            k = self._take()
            dst = self.slots[k][:(b - a) * es].view(flat.dtype)
            if self.ops is not None:
                self.ops.copy(dst, flat[a:b], self.copy_stream)
                ev = self.ops.record(self.copy_stream)
            else:
                dst.copy_(flat[a:b])
                ev = None
            self.jobs.put((name, a, b, k, dst, ev, float(scale)))

    def _take(self) -> int:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            t0 = time.perf_counter()
            k = self.free.get()
            self.wait_s += time.perf_counter() - t0
            return k

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                self.jobs.task_done()
                return
            name, a, b, k, dst, ev, scale = job
            t0 = time.perf_counter()
            try:
                if self.error is None:
                    if ev is not None:
                        self.ops.synchronize(ev)
                    score = self.scores.get(name)
                    if score is None:
                        score = self.scores[name] = torch.zeros(self.params[name].shape,
                                                                dtype=torch.float32)
                    self.accumulate(name, score.view(-1)[a:b], self.theta[name].view(-1)[a:b],
                                    dst, scale)
            except BaseException as e:  # noqa: BLE001 - raised on the autograd thread
                self.error = e
            finally:
                self.busy_s += time.perf_counter() - t0
                self.free.put(k)
                self.jobs.task_done()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"host score accumulation failed: {self.error}") from self.error

    def finish(self) -> dict[str, torch.Tensor]:
        """Wait until every queued chunk is added; stop the worker; return {name: fp32 host
        buffer} of the parameters that got a gradient."""
        self.jobs.join()
        self.close()
        self._check()
        return self.scores

    def close(self) -> None:
        """Stop the worker thread (idempotent; queued chunks are still added first)."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
