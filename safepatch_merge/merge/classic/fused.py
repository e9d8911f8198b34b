"""Fused kernels of the classic merges' elementwise work: C++ loops on CPU
(:mod:`.cpu_kernels`, ops of the csrc extension), torch.compile (Inductor) elsewhere.

In eager torch every step of :func:`.combine.combine_deltas` is a pass over memory (some 30
for TIES); on large chunks that, not arithmetic, is the cost. Here the same operations, in
the same order and float32 precision, run as one loop per chunk (and |x − b| as one pass
before the radix histograms), so the results are the eager results bit for bit
(tests/test_classic_fused.py). Used for chunks of at least MIN_FUSED elements; small tensors
stay eager (building or compiling is slower than running them).

SAFEPATCH_CLASSIC_COMPILE=0 disables both, =1 forces them even for small chunks;
SAFEPATCH_NO_EXT=1 disables the extension, so CPU chunks then take torch.compile. A build or
compile failure (no C++ compiler, unsupported platform) is logged once and the eager path is
used from then on.
"""
from __future__ import annotations

import logging
import os

import torch

from . import cpu_kernels
from .cpu_kernels import KIND_ALL, KIND_NONE, KIND_RANDOM, KIND_TRIM, KIND_TRIM0
from .terms import KEEP_NONE, KEEP_RANDOM, KEEP_TRIM

log = logging.getLogger("safepatch_merge.merge")

MIN_FUSED = 1 << 20
_kernels: dict = {}
_state = {"failed": False}


def enabled(numel: int) -> bool:
    """Whether a chunk of `numel` elements takes the compiled path."""
    mode = os.environ.get("SAFEPATCH_CLASSIC_COMPILE", "auto").strip().lower()
    if mode in ("0", "false", "no", "off") or _state["failed"]:
        return False
    if mode in ("1", "true", "yes", "on"):
        return True
    return numel >= MIN_FUSED


def _compiled(key, build):
    fn = _kernels.get(key)
    if fn is None:
        fn = _kernels[key] = torch.compile(build(), dynamic=True)
    return fn


def _run(key, build, *args):
    try:
        return _compiled(key, build)(*args)
    except Exception as e:  # noqa: BLE001 - any compile problem: fall back to eager
        if not _state["failed"]:
            log.warning("classic merges: torch.compile unavailable (%s: %s); using eager "
                        "torch", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _state["failed"] = True
        return None


def _cpu(t: torch.Tensor):
    if t.device.type != "cpu":
        return None
    return cpu_kernels.load()


def abs_delta(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """float32 |float32(x) − float32(base)| in one pass, or None (use eager)."""
    mod = _cpu(x)
    if mod is not None:
        return mod.abs_delta(x.contiguous(), base.contiguous())

    def build():
        def f(x, b):
            return (x.float() - b.float()).abs()
        return f
    return _run(("absdelta",), build, x, base)


def has_cpu_kernels(t: torch.Tensor) -> bool:
    """Whether the fused C++ kernels serve tensors like `t` (CPU, extension built)."""
    return _cpu(t) is not None


def abs_delta_histogram(x: torch.Tensor, base: torch.Tensor, prefix: int, digit: int
                        ) -> torch.Tensor | None:
    """int64 (65536,) histogram of one radix digit of |float32(x) − float32(base)| (the counts
    of ops.radix_histogram on abs_delta's output) without materialising |d|; None where only
    the eager path serves (then take abs_delta and the histogram op)."""
    mod = _cpu(x)
    if mod is None:
        return None
    return mod.abs_delta_histogram(x.contiguous(), base.contiguous(), int(prefix), int(digit))


def merge(base: torch.Tensor, xs: list[torch.Tensor], terms, *, consensus: bool,
          normalize: bool, lam: float, out_dtype: torch.dtype, masks: list,
          cuts: list[int] | None = None) -> torch.Tensor | None:
    """The fused equivalent of combine_deltas on flat chunks; None if compilation failed.

    base, xs: flat chunks in their own dtypes. masks[i]: bool keep mask of a KEEP_RANDOM term
    (else None). cuts[i]: a KEEP_TRIM term's tie cutoff within the chunk, in [0, numel]
    (|d| == threshold kept before it, dropped from it on; default numel: all kept)."""
    n = base.numel()
    cuts = [n] * len(terms) if cuts is None else [min(max(int(c), 0), n) for c in cuts]
    kinds = tuple("none" if t.keep == KEEP_NONE else
                  ("trim" if c >= n else "trimgt" if c == 0 else "trimcut")
                  if t.keep == KEEP_TRIM and t.threshold > 0 else
                  "trim0" if t.keep == KEEP_TRIM else
                  "random" if t.keep == KEEP_RANDOM else "all" for t, c in zip(terms, cuts))
    scaled = tuple(t.factor != 1.0 for t in terms)
    f32 = torch.float32
    thr = [torch.tensor(t.threshold, dtype=f32) for t in terms]
    fac = [torch.tensor(t.factor, dtype=f32) for t in terms]
    ws = [torch.tensor(t.weight, dtype=f32) for t in terms]
    lin_div = torch.stack(ws).sum() if ws else torch.ones((), dtype=f32)
    if lin_div.abs() < 1e-8:
        lin_div = torch.ones((), dtype=f32)
    lam_t = torch.tensor(lam, dtype=f32)
    mask_args = [m if m is not None else torch.ones((), dtype=torch.bool) for m in masks]
    mod = _cpu(base)
    if mod is not None:
        ids = {"none": KIND_NONE, "all": KIND_ALL, "trim": KIND_TRIM, "trimgt": KIND_TRIM,
               "trimcut": KIND_TRIM, "trim0": KIND_TRIM0, "random": KIND_RANDOM}
        return mod.merge(base.contiguous(), [x.contiguous() for x in xs],
                         [ids[k] for k in kinds], [t.threshold for t in terms], cuts,
                         [t.factor for t in terms], [t.weight for t in terms],
                         [m.contiguous() for m in mask_args], consensus, normalize,
                         float(lin_div), float(lam), out_dtype)
    key = ("merge", kinds, scaled, consensus, normalize, lam != 1, out_dtype)
    cut_t = [torch.tensor(c, dtype=torch.int64) for c in cuts]

    def build():
        def f(base, xs, thr, cut, fac, ws, masks, lin_div, lam_t):
            b = base.float()
            wds = []
            mixed = None
            for i, kind in enumerate(kinds):
                if kind == "none":
                    continue
                d = xs[i].float() - b
                if kind == "trim":
                    d = d * (d.abs() >= thr[i])
                elif kind == "trimgt":
                    d = d * (d.abs() > thr[i])
                elif kind == "trimcut":
                    ad = d.abs()
                    idx = torch.arange(ad.numel(), device=ad.device)
                    d = d * ((ad > thr[i]) | ((ad == thr[i]) & (idx < cut[i])))
                elif kind == "trim0":
                    d = d * (d.abs() > 0)
                elif kind == "random":
                    d = d * masks[i]
                if scaled[i]:
                    d = d * fac[i]
                wd = d * ws[i]
                if consensus:
                    wds.append((wd, ws[i]))
                else:
                    mixed = wd if mixed is None else mixed + wd
            if consensus and wds:
                elected = wds[0][0]
                for wd, _ in wds[1:]:
                    elected = elected + wd
                positive = elected >= 0
                div = None
                for wd, w in wds:
                    agree = torch.where(positive, wd > 0, wd < 0)
                    part = wd * agree
                    mixed = part if mixed is None else mixed + part
                    wpart = agree.float() * w
                    div = wpart if div is None else div + wpart
                if normalize:
                    mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
            elif mixed is not None and normalize:
                mixed = mixed / lin_div
            if mixed is None:
                return b.to(out_dtype)
            if lam != 1:
                mixed = mixed * lam_t
            return (mixed + b).to(out_dtype)
        return f

    return _run(key, build, base, list(xs), thr, cut_t, fac, ws, mask_args, lin_div, lam_t)
