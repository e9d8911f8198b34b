"""Value checks on what a merge reads and writes, whatever caches the pre-pass used.

Scores must be finite and non-negative (-0 counts as 0). The pre-pass validates them through
their digit-0 histograms, but a histogram can come from a file (the score directory's
``histograms.safetensors``, a threshold cache) that no longer matches the scores; so every
score chunk read from disk is checked again, on the reader thread, in host memory
(:func:`score_reader_check`). A merged output chunk must be finite unless
``output.allow_nonfinite`` (α = 1e38 overflows bfloat16 to inf); it is checked on the writer
thread, in the host copy that is about to be written (:func:`check_output`). Neither check
runs on the thread that computes, nor on an accelerator.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import CheckpointError, ConfigError, clip

# a float dtype's bits as a signed int: non-negative finite values are exactly [0, limit)
_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.bfloat16: (torch.int16, 0x7F80),
         torch.float16: (torch.int16, 0x7C00)}


def check_scores(label: str, name: str, chunk: torch.Tensor, offset: int) -> None:
    """Raise CheckpointError naming `label` (role and source), tensor `name` and the first
    bad element (`offset` = the chunk's first element in the tensor) unless every score of
    the 1-D host `chunk` is finite and >= 0."""
    if chunk.numel() == 0 or not chunk.is_floating_point():
        return
    if chunk.dtype in _BITS and chunk.is_contiguous():
        # the bits as integers: twice as fast as a float aminmax for fp32, five times for
        # bf16; -0 reads as negative here, so a hit is confirmed by the exact test below
        ity, limit = _BITS[chunk.dtype]
        lo, hi = torch.aminmax(chunk.view(ity))
        if int(lo) >= 0 and int(hi) < limit:
            return
    lo, hi = torch.aminmax(chunk)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)) and float(lo) >= 0:
        return
    raise CheckpointError(f"{label}: scores of tensor {clip(name, 200)} contain "
                          f"{_describe(chunk, True, offset)}; saliency scores must be finite "
                          "and >= 0")


def check_output(name: str, chunk: torch.Tensor, offset: int) -> None:
    """Raise ConfigError naming tensor `name` and the first bad element unless every value
    of the host `chunk` (a piece of merged tensor `name` starting at element `offset`) is
    finite."""
    if chunk.numel() == 0 or not chunk.is_floating_point():
        return
    lo, hi = torch.aminmax(chunk)  # NaN and ±inf show in the minimum or the maximum
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    raise ConfigError(f"the merged tensor {clip(name, 200)} has "
                      f"{_describe(chunk, False, offset)} (alpha/beta too large for the output "
                      "dtype, or non-finite inputs); set output.allow_nonfinite: true to write "
                      "them anyway")


def score_reader_check(labels: dict[str, str]) -> Callable:
    """A Prefetcher check: parts delivered under a key of `labels` ({role: "role source"})
    are score chunks to validate with check_scores."""
    def check(part, chunk: torch.Tensor) -> None:
        label = labels.get(part.key)
        if label is not None:
            check_scores(label, part.info.name, chunk, part.elem_start)
    return check


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
