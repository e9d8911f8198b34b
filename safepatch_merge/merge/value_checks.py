"""Value checks on the merge pass's own reads and results, whatever caches the pre-pass used.

Scores must be finite and non-negative (-0 counts as 0). The pre-pass validates them through
their digit-0 histograms, but a histogram can come from a file (the score directory's
``histograms.safetensors``, a threshold cache) that no longer matches the scores; so every
score chunk the merge pass reads is checked again here. A merged output chunk must be finite
unless ``output.allow_nonfinite`` (e.g. α = 1e38 overflows bfloat16 to inf).

On the CPU each chunk is checked as it goes (one ``aminmax`` pass) and the error names the
first bad element. On an accelerator a per-tensor running minimum and maximum stay on the
device (no synchronisation per chunk) and :meth:`ValueWatch.check` reads them back once.
"""
from __future__ import annotations

import math

import torch

from ..errors import CheckpointError, ConfigError, SafepatchError, brief


class ValueWatch:
    """Collects chunks to check. ``scores(label, name, chunk, offset)``: finite and >= 0;
    ``output(name, chunk, offset)``: finite. ``check()`` raises for deferred device chunks."""

    def __init__(self, defer: bool | None = None):
        """defer: keep running extremes and judge at check() (default: for device chunks)."""
        self._dev: dict[tuple[str, str, bool], list[torch.Tensor]] = {}
        self._defer = defer

    def scores(self, label: str, name: str, chunk: torch.Tensor, offset: int) -> None:
        self._add(label, name, chunk, offset, True)

    def output(self, name: str, chunk: torch.Tensor, offset: int) -> None:
        self._add("", name, chunk, offset, False)

    def _add(self, label, name, chunk, offset, nonneg) -> None:
        if chunk.numel() == 0 or not chunk.is_floating_point():
            return
        if not (chunk.device.type != "cpu" if self._defer is None else self._defer):
            if _suspect(chunk, nonneg) and _bad(*(float(v) for v in torch.aminmax(chunk)),
                                                nonneg):
                raise _error(label, name, nonneg, _describe(chunk, nonneg, offset))
            return
        lo, hi = torch.aminmax(chunk)
        key = (label, name, nonneg)
        acc = self._dev.get(key)
        if acc is None:
            self._dev[key] = [lo.clone(), hi.clone()]
        else:  # NaN propagates through minimum/maximum, so it is never lost
            torch.minimum(acc[0], lo, out=acc[0])
            torch.maximum(acc[1], hi, out=acc[1])

    def check(self) -> None:
        """Read the device accumulators back (one copy) and raise for the first bad tensor."""
        if not self._dev:
            return
        keys = list(self._dev)
        vals = torch.stack([torch.stack([a[0].float(), a[1].float()]) for a in
                            self._dev.values()]).cpu().tolist()
        self._dev.clear()
        for (label, name, nonneg), (lo, hi) in zip(keys, vals):
            if _bad(lo, hi, nonneg):
                what = "negative or NaN/inf" if nonneg else "NaN/inf"
                raise _error(label, name, nonneg, f"{what} values")


# a float dtype's bits as a signed int: non-negative finite values are exactly [0, limit)
_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.bfloat16: (torch.int16, 0x7F80),
         torch.float16: (torch.int16, 0x7C00)}


def _suspect(chunk: torch.Tensor, nonneg: bool) -> bool:
    """A fast test that passes every good chunk: for scores, an integer aminmax of the bits
    (twice as fast as the float one for fp32 on the CPU, five times for bf16); -0 reads as
    negative here, so a hit is confirmed by the exact float test."""
    if nonneg and chunk.dtype in _BITS and chunk.is_contiguous():
        ity, limit = _BITS[chunk.dtype]
        lo, hi = torch.aminmax(chunk.view(ity))
        return int(lo) < 0 or int(hi) >= limit
    return True


def _bad(lo: float, hi: float, nonneg: bool) -> bool:
    return not (math.isfinite(lo) and math.isfinite(hi)) or (nonneg and lo < 0)


def _describe(chunk: torch.Tensor, nonneg: bool, offset: int) -> str:
    """'3 negative and 1 NaN/inf values (first at element 17)' for a chunk that failed."""
    flat = chunk.reshape(-1)
    finite = torch.isfinite(flat)
    ok = finite & (flat >= 0) if nonneg else finite
    parts = []
    neg = int((flat < 0).sum()) if nonneg else 0
    if neg:
        parts.append(f"{neg} negative")
    if int((~finite).sum()):
        parts.append(f"{int((~finite).sum())} NaN/inf")
    first = offset + int(torch.nonzero(~ok)[0])
    return f"{' and '.join(parts)} values (first at element {first})"


def _error(label: str, name: str, nonneg: bool, detail: str) -> SafepatchError:
    if nonneg:
        return CheckpointError(f"{label}: scores of tensor {brief(name, 200)} contain {detail}; "
                               "saliency scores must be finite and >= 0")
    return ConfigError(f"the merged tensor {brief(name, 200)} has {detail} (alpha/beta too "
                       "large for the output dtype, or non-finite inputs); set "
                       "output.allow_nonfinite: true to write them anyway")
