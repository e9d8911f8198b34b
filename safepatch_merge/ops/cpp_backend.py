"""The csrc extension's kernels of the ``safepatch::`` ops as a backend: C++ for CPU tensors,
CUDA C++ where it was built with CUDA sources. Same functions and signatures as
``reference.py``; the arguments are lowered to the schema's by :mod:`.lowering` (shared with
the Triton backend) and arrive validated by ``safepatch_merge.ops``.
"""
from __future__ import annotations

import torch

from . import _extension
from .lowering import CompiledOps
from .philox import fnv1a32

_M32 = 0xFFFFFFFF


def available(device: torch.device | str) -> bool:
    """True when the extension is loaded and has kernels for `device`'s type."""
    device = torch.device(device)
    if device.type == "cpu":
        return _extension.load()
    if device.type == "cuda":
        return _extension.has_cuda()
    return False


_ops = CompiledOps("", contiguous=False)
saliency_accumulate_ = _ops.saliency_accumulate_
radix_histogram = _ops.radix_histogram
masked_merge = _ops.masked_merge


def philox_words(offset: int, numel: int, seed: int, name: str, patch_id: int) -> torch.Tensor:
    """int64 (numel,) retention words of elements offset.. of tensor `name` (C++, CPU)."""
    if not _extension.load():
        raise RuntimeError(f"the C++ extension is unavailable: {_extension.error()}")
    return torch.ops.safepatch.philox_words(offset, numel, seed & _M32, fnv1a32(name), patch_id)
