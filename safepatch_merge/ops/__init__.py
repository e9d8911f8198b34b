"""The three ops of SafePatching, each one public function; backends chosen per call.

Backends (docs/design.md §2): ``triton`` (CUDA tensors), ``cpp`` (the optional torch extension built
from csrc/: C++ for CPU tensors, CUDA C++ where built) and ``reference`` (plain torch, the
ground truth). Automatic choice: CUDA tensors -> triton, else cpp, else reference (for
radix_histogram and saliency_accumulate_: cpp, else triton, else reference); CPU tensors ->
cpp, else reference. Force one with the environment variable
``SAFEPATCH_BACKEND=reference|cpp|triton`` or :func:`set_backend` (the CLI's ``--backend``).
``SAFEPATCH_NO_EXT=1`` disables the extension. Which backend runs is logged once per device.

The compiled backends run as ``torch.library`` custom ops (``safepatch::*``, :mod:`.library`)
with fake implementations, so these functions trace under ``torch.compile(fullgraph=True)``;
a compiled function keeps the backend chosen when it was traced.

All arguments are validated here, once, so every backend may assume its preconditions.
"""
from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple

import torch

from . import cpp_backend, library, reference, triton_backend  # noqa: F401 - library: the ops
from .philox import fnv1a32, keep_threshold, retention_mask, retention_words  # noqa: F401
from .reference import MODES, NUM_BINS, RETENTION_ORDERS, score_keys, threshold_key  # noqa: F401

log = logging.getLogger("safepatch_merge.ops")

BACKENDS = ("reference", "cpp", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODULES = {"reference": reference, "cpp": cpp_backend, "triton": triton_backend}
_forced: str | None = None
_announced: set = set()


class MergeMasks(NamedTuple):
    """Output of :func:`masked_merge` with ``return_masks=True``: the merged tensor and the
    bool masks R_X ⊙ M_X actually applied to each patch (shape of `base`)."""

    out: torch.Tensor
    applied_se: torch.Tensor
    applied_osm: torch.Tensor


def set_backend(name: str | None) -> None:
    """Force a backend for all later calls (None restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
    _forced = None if name in (None, "auto") else name


def _requested() -> str | None:
    if _forced is not None:
        return _forced
    env = os.environ.get("SAFEPATCH_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"SAFEPATCH_BACKEND={env!r} is not one of {', '.join(BACKENDS)} or auto")
    return env


def _backend_module(name: str, device: torch.device):
    if name == "reference":
        return reference
    if name == "cpp":
        from . import cpp_backend

        return cpp_backend if cpp_backend.available(device) else None
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return None
        try:
            from . import triton_backend
        except ImportError:
            return None
        return triton_backend if triton_backend.available(device) else None
    raise ValueError(name)


# Automatic order per device type, and per op where one op differs. On CUDA, radix_histogram
# prefers the CUDA C++ kernel: on an H200 (bench/results/gpu_h200.md, 2^26 fp32 scores,
# digit 0) it reached 64 % of copy bandwidth against 3.3 % for the Triton kernel
# (tl.histogram over 65,536 bins cannot keep a block-private histogram in shared memory; the
# C++ kernel keeps packed 16-bit counters there). saliency_accumulate_ prefers it too: both
# kernels run at 91-97 % of copy bandwidth (bench/results/gpu_h200/bars.txt), but the op is
# called from one autograd hook per parameter, mostly on small tensors, where the launch is
# the cost: a torch.ops call is a few microseconds, a Triton JIT launch tens (bench_score on
# the H200 with the Triton kernel: SNIP 1.31x a forward+backward, CPU-bound, ~95 us per hook).
# merge_chunk prefers Triton (89-97 % of copy vs 52 % for the C++ kernel).
_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}
_OP_ORDER = {("cuda", "radix_histogram"): ("cpp", "triton", "reference"),
             ("cuda", "saliency_accumulate_"): ("cpp", "triton", "reference")}


def backend_for(device: torch.device | str, op: str | None = None) -> tuple[str, object]:
    """(name, module) of the backend that serves op `op` (None: any op) on `device`'s tensors.

    A forced backend (set_backend / SAFEPATCH_BACKEND) serves every op; otherwise the first
    available one in the device's (and op's) order of preference.
    """
    device = torch.device(device)
    if torch.compiler.is_compiling():
        # Traced: the choice is made once, at trace time, and the graph calls that backend's
        # op (a compiled function keeps the backend it was compiled with).
        name = _traced_choice(device, op)
        return name, _MODULES[name]
    return _choose(device, op)


def _choose(device: torch.device, op: str | None) -> tuple[str, object]:
    want = _requested()
    if want is not None:
        mod = _backend_module(want, device)
        if mod is None:
            raise RuntimeError(f"backend {want!r} is not available for {device.type} tensors")
        chosen = (want, mod)
    else:
        order = _OP_ORDER.get((device.type, op)) or _ORDER.get(device.type, ("cpp", "reference"))
        chosen = next((n, m) for n in order if (m := _backend_module(n, device)) is not None)
    if (device.type, op, chosen[0]) not in _announced:
        _announced.add((device.type, op, chosen[0]))
        log.info("safepatch_merge ops: %s tensors use the %s backend%s", device.type, chosen[0],
                 "" if op is None else f" for {op}")
    return chosen


@torch.compiler.assume_constant_result
def _traced_choice(device: torch.device, op: str | None) -> str:
    """backend_for's name, computed outside the traced graph (it builds, loads and logs)."""
    return _choose(device, op)[0]


def _check_tensor(t: torch.Tensor, what: str, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{what} has unsupported layout {t.layout}; only dense (strided) tensors")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous())")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{what} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")


def _check_like(t: torch.Tensor, ref: torch.Tensor, what: str, ref_what: str) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)} but {ref_what} has {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{what} is on {t.device} but {ref_what} is on {ref.device}")


def saliency_accumulate_(score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
    """Add the signed SNIP product into a score buffer, in place: score += scale·weight·grad.

    score: float32, contiguous, any shape (the parameter's). weight, grad: same shape, each
    float32, bfloat16 or float16 (may differ); products computed in fp32. scale: the batch's
    weight in the mean loss over the scoring set (e.g. batch examples / set examples).
    Returns `score`. Take |score| once at the end with :func:`saliency_finalize_`.
    """
    _check_tensor(score, "score", (torch.float32,))
    _check_tensor(weight, "weight")
    _check_tensor(grad, "grad")
    _check_like(weight, score, "weight", "score")
    _check_like(grad, score, "grad", "score")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    _, mod = backend_for(score.device, "saliency_accumulate_")
    return mod.saliency_accumulate_(score, weight, grad, float(scale))


def saliency_finalize_(score: torch.Tensor) -> torch.Tensor:
    """In place: score = |score| (float32). Returns `score`."""
    _check_tensor(score, "score", (torch.float32,))
    return score.abs_()


def _check_draw(seed, offset) -> None:
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def radix_histogram(scores: torch.Tensor, prefix: int = 0, digit: int = 0, *, p: float = 1.0,
                    seed: int = 0, name: str = "", patch_id: int = 0,
                    offset: int = 0) -> torch.Tensor:
    """int64 histogram (65536 bins, on scores' device) of one 16-bit digit of the score keys.

    scores: float32, bfloat16 or float16, any shape; keys are the bits of float32(score) with
    -0 -> 0 (see reference.py). digit 0: bins of key >> 16 over all elements; digit 1: bins of
    key & 0xFFFF over elements whose key >> 16 == prefix. Histograms of chunks and tensors add
    up. Invalid scores show in digit 0: bins >= 0x7F80 (inf/NaN) and >= 0x8000 (negative).

    Retained scores (retention before selection): with p < 1, an element that the retention
    draw of patch `patch_id` (0 SE, 1 OSM) drops counts as key 0; p, seed, name and offset
    (the chunk's first element inside tensor `name`) as in :func:`masked_merge`, so the
    histogram sees exactly the R_X that masked_merge applies. Invalid scores keep their keys
    whether retained or not. p == 1 is the plain histogram.
    """
    _check_tensor(scores, "scores")
    if digit not in (0, 1):
        raise ValueError(f"digit must be 0 or 1, got {digit!r}")
    if digit == 1 and not (0 <= prefix < NUM_BINS):
        raise ValueError(f"prefix must be in [0, 65535] for digit 1, got {prefix!r}")
    keep_threshold(p)  # validates p in [0, 1]
    if patch_id not in (0, 1):
        raise ValueError(f"patch_id must be 0 (SE) or 1 (OSM), got {patch_id!r}")
    _check_draw(seed, offset)
    _, mod = backend_for(scores.device, "radix_histogram")
    if p >= 1.0:  # the plain call: every backend's unchanged fast path
        return mod.radix_histogram(scores, int(prefix), int(digit))
    return mod.radix_histogram(scores, int(prefix), int(digit), p=float(p), seed=seed, name=name,
                               patch_id=int(patch_id), offset=offset)


def masked_merge(base: torch.Tensor, patch_se: torch.Tensor | None, patch_osm: torch.Tensor | None,
                 score_se: torch.Tensor | None = None, score_osm: torch.Tensor | None = None, *,
                 t_se: float = math.inf, t_osm: float = math.inf, mode: str = "difference",
                 alpha: float = 1.0, beta: float = 1.0, p: float = 1.0, rescale: bool = False,
                 seed: int = 0, name: str = "", offset: int = 0, patches_are_deltas: bool = True,
                 out_dtype: torch.dtype | None = None, return_masks: bool = False,
                 retention_order: str = "after_selection",
                 applied_counts: torch.Tensor | None = None):
    """SafePatching's merge of one tensor (or one chunk of it), in one pass. Not in place.

    out = base + α·(R_SE ⊙ M_SE ⊙ P_SE)/s + β·(R_OSM ⊙ M_OSM ⊙ P_OSM)/s   (docs/design.md §1.7)

    base: float32/bfloat16/float16, contiguous, any shape. patch_se / patch_osm: same shape,
    any of those dtypes, deltas P_X (patches_are_deltas=True) or full patched tensors θ_X (the
    delta is then taken in fp32 inside the op); None drops that term (its T_X is empty).
    score_se / score_osm: same shape, float32/bfloat16/float16 saliency, non-negative and
    finite (not re-checked here: the selection pass validates); needed unless mode == "none"
    or the matching patch is None. t_se / t_osm: fp32 thresholds from the exact top-k
    selection (select.py); +inf selects nothing. mode: difference | intersection | topk | none.
    p: retention rate in [0, 1]; rescale divides kept deltas by p (DARE); the mask comes from
    Philox4x32-10 keyed by (seed, name), counter from element index offset + i (offset: the
    chunk's first element inside the full tensor, int64). out_dtype: defaults to base.dtype.
    retention_order: ``after_selection`` (above) or ``before_selection``: T_X = R_X and
    S_X >= t_X and S_X > 0, the mode combines those retained top sets, and the merge adds
    M_X ⊙ P_X (t_X then comes from :func:`radix_histogram` of the retained scores); mode
    ``none`` and p == 1 are the same under both. applied_counts: optional int64 tensor of
    shape (2,) on base's device; the numbers of elements whose SE / OSM term is applied are
    added to it in place (sums over chunks without a host sync).
    Returns the merged tensor (shape of base), or :class:`MergeMasks` if return_masks.
    """
    _check_tensor(base, "base")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for what, t in (("patch_se", patch_se), ("patch_osm", patch_osm)):
        if t is not None:
            _check_tensor(t, what)
            _check_like(t, base, what, "base")
    for what, t, patch in (("score_se", score_se, patch_se), ("score_osm", score_osm, patch_osm)):
        if t is None:
            if patch is not None and mode != "none":
                raise ValueError(f"{what} is required for mode {mode!r} when its patch is given")
            continue
        _check_tensor(t, what)
        _check_like(t, base, what, "base")
    for what, t in (("t_se", t_se), ("t_osm", t_osm)):
        if not isinstance(t, (int, float)) or math.isnan(t):
            raise ValueError(f"threshold {what} must be a number, got {t!r}")
        if t < 0:
            raise ValueError(f"threshold {what} must be >= 0, got {t!r}")
    for what, v in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(v):
            raise ValueError(f"{what} must be finite, got {v!r}")
    keep_threshold(p)  # validates p in [0, 1]
    if rescale and p == 0:
        raise ValueError("rescale needs p > 0 (it divides the kept deltas by p)")
    _check_draw(seed, offset)
    if retention_order not in RETENTION_ORDERS:
        raise ValueError(f"retention_order must be one of {', '.join(RETENTION_ORDERS)}, got "
                         f"{retention_order!r}")
    if applied_counts is not None:
        _check_tensor(applied_counts, "applied_counts", (torch.int64,))
        if applied_counts.shape != (2,) or applied_counts.device != base.device:
            raise ValueError(f"applied_counts must be an int64 tensor of shape (2,) on "
                             f"{base.device}, got shape {tuple(applied_counts.shape)} on "
                             f"{applied_counts.device}")
    out_dtype = out_dtype or base.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    _, mod = backend_for(base.device, "masked_merge")
    res = mod.masked_merge(base, patch_se, patch_osm, score_se, score_osm, t_se=float(t_se),
                           t_osm=float(t_osm), mode=mode, alpha=float(alpha), beta=float(beta),
                           p=float(p), rescale=bool(rescale), seed=seed, name=name, offset=offset,
                           patches_are_deltas=patches_are_deltas, out_dtype=out_dtype,
                           return_masks=return_masks, retention_order=retention_order,
                           applied_counts=applied_counts)
    return MergeMasks(*res) if return_masks else res


__all__ = [
    "BACKENDS", "MODES", "NUM_BINS", "RETENTION_ORDERS", "MergeMasks", "backend_for", "set_backend",
    "saliency_accumulate_", "saliency_finalize_", "radix_histogram", "masked_merge",
    "score_keys", "threshold_key", "fnv1a32", "keep_threshold", "retention_mask", "retention_words",
]
