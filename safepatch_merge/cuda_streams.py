"""The few CUDA stream / event / memory calls of the host <-> device pipelines.

The merge engine's transfers (merge/transfer.py) and the SNIP host score buffers
(score/host_buffers.py) make every CUDA call through :class:`CudaOps`, so their tests can run
the same ordering on the CPU with a fake whose copies happen as late as the events allow.
"""
from __future__ import annotations

import torch


class CudaOps:
    """The few CUDA stream / event / memory calls the transfers need."""

    pin = True  # the reader's slots are pinned, so uploads from them are asynchronous

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def record(self, stream):
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def wait(self, stream, ev) -> None:
        stream.wait_event(ev)

    def query(self, ev) -> bool:
        return ev.query()

    def synchronize(self, ev) -> None:
        ev.synchronize()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def retain(self, t: torch.Tensor, stream) -> None:
        """Keep device tensor `t`'s memory from reuse until the work queued on `stream` so far
        has run (for a tensor made on another stream and freed before that work ran)."""
        t.record_stream(stream)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def device_bytes(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def cache_limit(self) -> int:
        """Bytes of device memory the engine may keep pre-pass chunks in: half of what is
        free now, so a smaller card than --max-memory assumes is never run out of memory."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free // 2


def ops_for(device: torch.device):
    """The transfer calls for `device`, or None where the work runs on the host itself."""
    return CudaOps(device) if device.type == "cuda" else None
