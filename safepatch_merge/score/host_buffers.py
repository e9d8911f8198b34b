"""SNIP score buffers in host memory, fed from the accelerator (``--score-buffers host``).

On a GPU the fp32 score buffers are twice the size of bf16 gradients and live through every
batch's activations, so scoring with them on the device peaks above keeping a batch's
gradients (SmolLM2-135M, batch 8 × 512, H200: 6363 vs 6331 MB). Here the buffers, and a host
copy of θ, live in host memory instead; the device holds the model, the activations and the
gradients whose copies are in flight.

Each hook hands its gradient to :meth:`HostScoreBuffers.add`. It goes down into a ring of
pinned staging slots, on a copy stream that starts after the gradient was made; the
gradient's memory is kept from reuse until its copies have run. Gradients are packed one
after another into the slot being filled (a large one spills into the next), and a full slot
goes to a worker thread behind one event: per slot, not per parameter, so most of a model's
many small tensors cost the hooks a copy launch and no hand-over. The worker waits for the
slot's copies, adds each part into its host buffer (the same saliency op, on the CPU) and
gives the slot back. The autograd thread waits only when every slot is in flight.

Costs: host memory for the fp32 buffers plus θ in its own dtype (6 bytes per bf16
parameter), one device-to-host copy of every gradient per batch, and the CPU's add. For a
model on the CPU the buffers are in host memory anyway, so SnipAccumulator does not use this.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

SLOT_BYTES = 64 << 20
SLOTS = 4
ALIGN = 64  # bytes: where each gradient's part starts in a slot

# accumulate(name, score, weight, grad, scale): add one chunk's share into `score`; the three
# tensors are 1-D contiguous views of equal length on the host
Accumulate = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class HostScoreBuffers:
    """fp32 score buffers in host memory for `params`, filled by a worker thread.

    params: {name: parameter}, on one accelerator. ops: its transfer calls
    (:func:`~safepatch_merge.cuda_streams.ops_for`). accumulate: adds a chunk's contribution
    (runs on the worker thread). slot_bytes, slots: the pinned staging ring (bytes per slot,
    count; default SLOT_BYTES, SLOTS).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], ops, accumulate: Accumulate,
                 slot_bytes: int | None = None, slots: int | None = None):
        slot_bytes = SLOT_BYTES if slot_bytes is None else slot_bytes
        slots = SLOTS if slots is None else slots
        if slot_bytes < 64 or slots < 1:
            raise ValueError("slot_bytes must be >= 64 and slots >= 1")
        self.params, self.ops, self.accumulate = params, ops, accumulate
        # θ does not change while scoring: one host copy, read by every batch's adds
        self.theta = {n: p.detach().to("cpu").contiguous() for n, p in params.items()}
        self.scores: dict[str, torch.Tensor] = {}
        self.slot_bytes = slot_bytes
        self.slots = [ops.pinned(slot_bytes) for _ in range(slots)]
        self.compute = ops.current_stream()
        self.copy_stream = ops.new_stream()
        # the slot the hooks are filling: its index, bytes used, and the parts in it
        self._slot: int | None = None
        self._fill = 0
        self._parts: list = []
        self.free: queue.Queue = queue.Queue()
        for k in range(slots):
            self.free.put(k)
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.handed = 0  # slots handed to the worker
        self.thread = threading.Thread(target=self._run, name="safepatch-score-host", daemon=True)
        self.thread.start()

    def add(self, name: str, grad: torch.Tensor, scale: float) -> None:
        """Queue `scale`·(θ ⊙ grad) of parameter `name` into its host buffer (in a hook).
        grad: the parameter's gradient (its shape, any float dtype), contiguous; the caller
        may drop it at once."""
        self._check()
        flat = grad.reshape(-1)
        es = flat.element_size()
        self.ops.wait(self.copy_stream, self.ops.record(self.compute))
        self.ops.retain(flat, self.copy_stream)
        a, n = 0, flat.numel()
        while a < n:
            if self._slot is None:
                self._slot, self._fill, self._parts = self.free.get(), 0, []
            room = (self.slot_bytes - self._fill) // es  # negative once alignment passed the end
            if room <= 0:
                self._close()
                continue
            b = min(n, a + room)
            dst = self.slots[self._slot][self._fill:self._fill + (b - a) * es].view(flat.dtype)
            self.ops.copy(dst, flat[a:b], self.copy_stream)
            self._parts.append((name, a, b, dst, float(scale)))
            self._fill = -(-(self._fill + (b - a) * es) // ALIGN) * ALIGN  # next part aligned
            a = b

    def _close(self) -> None:
        """Hand the slot being filled to the worker, behind an event after its copies."""
        if self._slot is not None:
            self.jobs.put((self._slot, self._parts, self.ops.record(self.copy_stream)))
            self._slot, self._parts = None, []
            self.handed += 1

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                self.jobs.task_done()
                return
            k, segs, ev = job
            try:
                if self.error is None:
                    self.ops.synchronize(ev)
                    for name, a, b, dst, scale in segs:
                        score = self.scores.get(name)
                        if score is None:
                            score = self.scores[name] = torch.zeros(self.params[name].shape,
                                                                    dtype=torch.float32)
                        self.accumulate(name, score.view(-1)[a:b],
                                        self.theta[name].view(-1)[a:b], dst, scale)
            except BaseException as e:  # noqa: BLE001 - raised on the autograd thread
                self.error = e
            finally:
                self.free.put(k)
                self.jobs.task_done()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"host score accumulation failed: {self.error}") from self.error

    def finish(self) -> dict[str, torch.Tensor]:
        """Wait until every queued chunk is added; stop the worker; return {name: fp32 host
        buffer} of the parameters that got a gradient."""
        self._close()
        self.jobs.join()
        self.close()
        self._check()
        return self.scores

    def close(self) -> None:
        """Stop the worker thread (idempotent; queued chunks are still added first)."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
