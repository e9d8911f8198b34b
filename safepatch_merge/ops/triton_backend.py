"""The Triton kernels (``safepatch_merge.triton_kernels``) as an ops backend, through the
``safepatch::triton_*`` custom ops (:mod:`.library`).

Same signatures as :mod:`safepatch_merge.ops.reference`; the arguments are lowered to the
schema's by :mod:`.lowering` (shared with the C++ backend) and arrive validated by
``safepatch_merge.ops``. Serves CUDA tensors, and CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``, set before triton is first imported: tests on machines without CUDA).
"""
from __future__ import annotations

import os

import torch

from . import library
from .lowering import CompiledOps


def available(device: torch.device | str) -> bool:
    """True when Triton can run kernels on `device`'s tensors."""
    if not library.triton_ops():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


_ops = CompiledOps("triton_", contiguous=True)
saliency_accumulate_ = _ops.saliency_accumulate_
radix_histogram = _ops.radix_histogram
masked_merge = _ops.masked_merge
