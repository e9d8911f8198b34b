"""Several processes, one result: the process group and the collective error check that derive
and score share (torch.distributed, started by `torchrun` or `accelerate launch`).

A launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process;
:func:`init_process_group` joins them. :func:`agree` is how an error on one rank reaches the
others: every rank calls it at the same point with its own error (or None), and if any rank
failed, every rank raises the same one-line error naming the first failing rank. Without it a
rank that fails alone leaves the others waiting in their next collective until the process
group's timeout.
"""
from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch

from .errors import CheckpointError, ConfigError, DataError, SafepatchError

# Error classes that travel between ranks by index; 0 means "no error", and anything that is not
# a SafepatchError arrives as a SafepatchError carrying its type name.
_CLASSES = (None, SafepatchError, ConfigError, CheckpointError, DataError)
_MSG_BYTES = 1024


def launched() -> bool:
    """True in a process started by a distributed launcher (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    """WORLD_SIZE as the launcher set it (1 without a launcher)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def initialized() -> bool:
    """True once this process has joined a process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return torch.distributed.get_world_size() if initialized() else 1


def init_process_group(timeout_s: float) -> bool:
    """Join the launcher's processes if this process is not in a group yet.

    Backend: gloo for CPU tensors and, where CUDA exists, NCCL for CUDA tensors (one group
    serves both, so host score buffers and device tensors can both be reduced); each process
    uses the GPU of its LOCAL_RANK. timeout_s: how long a collective waits for a missing rank
    before failing (seconds). Returns True if this call created the group (it is then destroyed
    at interpreter exit).
    """
    if initialized():
        return False
    if not launched():
        raise ConfigError("several processes need a launcher: start the command with "
                          "torchrun --nproc-per-node N (or accelerate launch)")
    if not (timeout_s > 0):
        raise ConfigError(f"distributed timeout must be positive, got {timeout_s}")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if initialized():
        torch.distributed.destroy_process_group()


def quiet_other_ranks() -> None:
    """Log INFO from rank 0 only: other ranks keep warnings and errors (called by the CLI)."""
    if launched() and os.environ.get("RANK") != "0":
        logging.getLogger().setLevel(logging.WARNING)


def one_line(error: BaseException) -> str:
    """The error as one line: SafepatchErrors by their message, others prefixed by their type."""
    msg = " ".join(str(error).split())
    return msg if isinstance(error, SafepatchError) else f"{type(error).__name__}: {msg}"


def _encode(error: BaseException | None, device) -> torch.Tensor:
    # int32, not uint8: every backend (gloo, NCCL) gathers int32
    out = torch.zeros(2 + _MSG_BYTES, dtype=torch.int32)
    if error is not None:
        cls = next((i for i in range(len(_CLASSES) - 1, 0, -1)
                    if isinstance(error, _CLASSES[i])), 1)
        raw = one_line(error).encode()[:_MSG_BYTES]
        out[0], out[1] = cls, len(raw)
        out[2:2 + len(raw)] = torch.tensor(list(raw), dtype=torch.int32)
    return out.to(device)


def agree(error: BaseException | None, device: str | torch.device = "cpu") -> None:
    """Collective error check: every rank of the default group calls it at the same point.

    error: this rank's exception, or None. device: where the small exchange buffer lives ('cpu'
    for gloo, the rank's GPU for an NCCL-only group). Returns if no rank failed. Otherwise
    raises on every rank an error of the first failing rank's class (SafepatchError for any
    other exception) with the message "rank R of W: <its one-line message>"; the failing rank
    itself re-raises a non-SafepatchError unchanged, to keep its traceback. Without a process
    group (or with one process) it raises `error` itself.
    """
    if world_size() == 1:
        if error is not None:
            raise error
        return
    # one int on the way that succeeds; the messages only when some rank failed
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if not int(failed):
        return
    mine = _encode(error, device)
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    torch.distributed.all_gather(parts, mine)
    for r, p in enumerate(parts):
        p = p.cpu()
        code = int(p[0])
        if code == 0:
            continue
        if r == rank() and error is not None and not isinstance(error, SafepatchError):
            raise error
        msg = bytes(p[2:2 + int(p[1])].tolist()).decode(errors="replace")
        raise _CLASSES[code](f"rank {r} of {world_size()}: {msg}") from error


class collective_errors:
    """Context manager: an exception in the block, or on any other rank in its own block, ends
    the block on every rank through :func:`agree` (called once on exit, on every rank).

    Use around work that may fail on one rank only and is followed by collectives (a forward
    pass before a DDP backward, the write that rank 0 alone does)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if world_size() == 1 or (exc is not None and not isinstance(exc, Exception)):
            return False  # one process; or KeyboardInterrupt, SystemExit: leave at once
        agree(exc, self.device)
        return False


__all__ = ["launched", "launched_world_size", "initialized", "rank", "world_size",
           "init_process_group", "quiet_other_ranks", "one_line", "agree", "collective_errors"]
