"""The ops as ``torch.library`` custom ops, all in the namespace ``safepatch``.

Each op's schema is written once below and serves every implementation:

    safepatch::saliency_accumulate_, radix_histogram, masked_merge, philox_words
        kernels from the csrc extension (C++ for CPU, CUDA C++ where built), registered per
        dispatch key when the extension loads (safepatch_merge.ops._extension)
    safepatch::abs_delta, abs_delta_histogram, classic_merge
        the classic merges' fused loops, from the same extension (C++, CPU tensors only)
    safepatch::triton_saliency_accumulate_, triton_radix_histogram, triton_masked_merge
        the Triton kernels (CUDA tensors; CPU tensors under Triton's interpreter), registered
        when Triton imports (:func:`triton_ops`)

Every op has a fake (meta) implementation, so torch.compile and torch.export trace them and
``torch.library.opcheck`` checks them. The ops take the lowered arguments
(safepatch_merge.ops.lowering); ``safepatch_merge.ops`` is the validated public face, and the
plain-torch reference (safepatch_merge.ops.reference) the ground truth. None of the ops is
differentiable: autograd falls through to the kernels (their outputs never require grad).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from .reference import NUM_BINS

NAMESPACE = "safepatch"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive for the process


# ---------------------------------------------------------------- schemas (one per op)

# Integers are `int`, not `SymInt`: they are keys, hashes, seeds and element offsets, never
# sizes, so a compiled graph specialises on them instead of tracing them symbolically.
# masked_merge's mode is `mode_id`: an argument named `mode` collides with the mode parameter
# of torch's functionalization wrappers. The trailing defaulted arguments (retention before
# selection, applied counts) leave the plain calls valid: keep_threshold = 2^32 is the plain
# histogram, retain_first = False the merge with retention after selection.
SCHEMAS = {
    # in place: score += float32(scale) * (float32(weight) * float32(grad)); score fp32,
    # weight and grad fp32/bf16/fp16 with score's number of elements
    "saliency_accumulate_": "(Tensor(a!) score, Tensor weight, Tensor grad, float scale) -> ()",
    # int64 (65536,) histogram of one 16-bit digit of the score keys; keep_threshold < 2^32:
    # of the retained scores (lowering.HistogramArgs)
    "radix_histogram": "(Tensor scores, int prefix, int digit, int keep_threshold=4294967296, "
                       "int seed=0, int name_hash=0, int patch_id=0, int offset=0) -> Tensor",
    # (out, applied_se, applied_osm): out of base's shape in out_dtype; bool masks of base's
    # shape if return_masks, else of shape (0,); applied_counts (int64, 2) is added to
    # (lowering.MergeArgs)
    "masked_merge": "(Tensor base, Tensor? patch_se, Tensor? patch_osm, Tensor? score_se, "
                    "Tensor? score_osm, int key_se, int key_osm, int mode_id, float c_se, "
                    "float c_osm, int keep_threshold, int seed, int name_hash, int offset, "
                    "bool deltas, ScalarType out_dtype, bool return_masks, "
                    "bool retain_first=False, Tensor(a!)? applied_counts=None) "
                    "-> (Tensor, Tensor, Tensor)",
    # int64 (numel,) Philox4x32-10 retention words of elements offset.. (CPU)
    "philox_words": "(int offset, int numel, int seed, int name_hash, int patch_id) -> Tensor",
    # The classic merges' fused loops (CPU tensors; safepatch_merge/merge/classic/fused.py):
    # float32 (numel,) |float32(x) - float32(base)|
    "abs_delta": "(Tensor x, Tensor base) -> Tensor",
    # radix_histogram's int64 (65536,) counts of one digit of abs_delta's keys, without |d|
    "abs_delta_histogram": "(Tensor x, Tensor base, int prefix, int digit) -> Tensor",
    # one flat chunk of combine_deltas in out_dtype; one kind (cpu_kernels.KIND_*),
    # threshold, tie cutoff index, factor, weight and bool mask (random drop) per model
    "classic_merge": "(Tensor base, Tensor[] xs, int[] kinds, float[] thresholds, "
                     "int[] cutoffs, float[] factors, float[] weights, Tensor[] masks, "
                     "bool consensus, bool normalize, float lin_div, float lam, "
                     "ScalarType out_dtype) -> Tensor",
}
OPS = ("saliency_accumulate_", "radix_histogram", "masked_merge")  # the SafePatching ops
CLASSIC_OPS = ("abs_delta", "abs_delta_histogram", "classic_merge")  # CPU kernels only


# ---------------------------------------------------------------- fake implementations

def _fake_saliency_accumulate_(score, weight, grad, scale):
    return None


def _fake_radix_histogram(scores, prefix, digit, keep_threshold=1 << 32, seed=0, name_hash=0,
                          patch_id=0, offset=0):
    return scores.new_empty((NUM_BINS,), dtype=torch.int64)


def _fake_masked_merge(base, patch_se, patch_osm, score_se, score_osm, key_se, key_osm, mode_id,
                       c_se, c_osm, keep_threshold, seed, name_hash, offset, deltas, out_dtype,
                       return_masks, retain_first=False, applied_counts=None):
    mshape = base.shape if return_masks else (0,)
    return (base.new_empty(base.shape, dtype=out_dtype),
            base.new_empty(mshape, dtype=torch.bool), base.new_empty(mshape, dtype=torch.bool))


def _fake_philox_words(offset, numel, seed, name_hash, patch_id):
    return torch.empty((numel,), dtype=torch.int64)


def _fake_abs_delta(x, base):
    return x.new_empty((x.numel(),), dtype=torch.float32)


def _fake_abs_delta_histogram(x, base, prefix, digit):
    return x.new_empty((NUM_BINS,), dtype=torch.int64)


def _fake_classic_merge(base, xs, kinds, thresholds, cutoffs, factors, weights, masks, consensus,
                        normalize, lin_div, lam, out_dtype):
    return base.new_empty((base.numel(),), dtype=out_dtype)


FAKES = {"saliency_accumulate_": _fake_saliency_accumulate_,
         "radix_histogram": _fake_radix_histogram, "masked_merge": _fake_masked_merge,
         "philox_words": _fake_philox_words, "abs_delta": _fake_abs_delta,
         "abs_delta_histogram": _fake_abs_delta_histogram, "classic_merge": _fake_classic_merge}


def _define(name: str, schema: str, fake) -> None:
    _lib.define(name + schema)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    # Not differentiable: autograd passes straight through to the kernels (whose outputs then
    # never require grad) instead of the deprecated fallback that warns on backward.
    _lib.impl(name, torch.library.fallthrough_kernel, "Autograd")


for _name, _schema in SCHEMAS.items():
    _define(_name, _schema, FAKES[_name])


# ---------------------------------------------------------------- the Triton ops

_triton_lock = threading.Lock()
_triton_state: dict = {}


def _on(device: torch.device):
    """Make `device` current, so kernels launch where their tensors live (cuda:1, ...)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_ops() -> bool:
    """Register the ``safepatch::triton_*`` ops (once); False when Triton does not import."""
    with _triton_lock:
        if "ok" not in _triton_state:
            try:
                from safepatch_merge.triton_kernels import histogram as hist
                from safepatch_merge.triton_kernels import masked_merge as merge
                from safepatch_merge.triton_kernels import saliency as sal
            except ImportError:  # triton missing or broken: no Triton ops, never an error here
                _triton_state["ok"] = False
            else:
                _register_triton(sal, hist, merge)
                _triton_state["ok"] = True
        return _triton_state["ok"]


def _register_triton(sal, hist, merge) -> None:
    def saliency_accumulate_(score: Tensor, weight: Tensor, grad: Tensor, scale: float) -> None:
        with _on(score.device):
            sal.saliency_accumulate_(score, weight, grad, scale)

    def radix_histogram(scores: Tensor, prefix: int, digit: int, keep_threshold: int = 1 << 32,
                        seed: int = 0, name_hash: int = 0, patch_id: int = 0,
                        offset: int = 0) -> Tensor:
        with _on(scores.device):
            return hist.radix_histogram(scores, prefix, digit, keep_threshold=keep_threshold,
                                        seed=seed, name_hash=name_hash, patch_id=patch_id,
                                        offset=offset)

    def masked_merge(base: Tensor, patch_se: Optional[Tensor], patch_osm: Optional[Tensor],
                     score_se: Optional[Tensor], score_osm: Optional[Tensor], key_se: int,
                     key_osm: int, mode_id: int, c_se: float, c_osm: float, keep_threshold: int,
                     seed: int, name_hash: int, offset: int, deltas: bool,
                     out_dtype: torch.dtype, return_masks: bool, retain_first: bool = False,
                     applied_counts: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        with _on(base.device):
            return merge.masked_merge(base, patch_se, patch_osm, score_se, score_osm, key_se,
                                      key_osm, mode_id, c_se, c_osm, keep_threshold, seed,
                                      name_hash, offset, deltas, out_dtype, return_masks,
                                      retain_first, applied_counts)

    # Kernels registered per dispatch key, like the extension's, rather than through
    # torch.library.triton_op: the kernels launch with enable_fp_fusion=False (no FMA
    # contraction, so values match the reference and the C++ kernels bit for bit), and that
    # option is not among the launch settings wrap_triton's tracing passes on (torch 2.13:
    # num_warps, num_stages, num_ctas, ...), so a kernel Inductor relaunches is not known to
    # keep it. A compiled graph calls the op, which launches exactly as in eager.
    keys = ["CUDA"] + (["CPU"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for name, fn in (("saliency_accumulate_", saliency_accumulate_),
                     ("radix_histogram", radix_histogram), ("masked_merge", masked_merge)):
        _define(f"triton_{name}", SCHEMAS[name], FAKES[name])
        for key in keys:
            _lib.impl(f"triton_{name}", fn, key)
