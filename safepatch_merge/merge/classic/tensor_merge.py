"""One output tensor of a classic merge: per-tensor statistics passes, then the merge.

TIES's trim (threshold and tie cutoff) and the L1 rescale factor are facts about a whole
tensor, so a tensor streamed in chunks is read more than once: :class:`TensorMerge` says
whether it still needs a statistics pass (``pending``), which chunks the pass needs
(``wants``), takes them (``observe``, any order), and then merges chunk by chunk (``merge``).
Each model goes through its own phases, one pass each:

* magnitude trim (ties): ``select`` — digit-0 histograms of |d_i|, then the digit-1
  refinement: the exact k-th largest |d_i| (:mod:`.trim`); ``ties`` — only when more entries
  tie at it than k leaves room for: per-chunk tie counts place the index cutoff (usually in
  that one pass; one more pass over a single chunk when chunks come out of order); with
  rescale, ``after`` sums the kept |d_i| (and the first pass sums all |d_i|).
* random drop (dare_*) with rescale: ``random`` sums |d_i| and the kept |d_i| (:mod:`.abs_sum`).
* task_arithmetic, or dare without rescale: no pass.

Everything per tensor is order- and chunking-free (integer histograms, exact sums, tie counts
in index order, Philox keyed by element index), so a chunked run and a whole-tensor run write
identical bits.
"""
from __future__ import annotations

import torch

from ... import ops
from ...errors import CheckpointError
from ..select import NonFiniteValuesError
from . import fused
from .abs_sum import ExactAbsSum, l1_rescale_factor
from .combine import combine_chunk, combine_deltas, retention_keep
from .spec import SPARSIFY_MAGNITUDE, SPARSIFY_RANDOM, MethodSpec, TensorParams
from .terms import KEEP_ALL, KEEP_NONE, KEEP_RANDOM, KEEP_TRIM, Term
from .trim import MagnitudeTrim, keep_mask, local_cutoff, trim_count

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SELECT, TIES, AFTER, RANDOM = "select", "ties", "after", "random"  # statistics phases


class _ModelState:
    def __init__(self, index: int, weight: float, density: float, spec: MethodSpec,
                 rescale: bool, numel: int):
        self.index, self.weight, self.density, self.numel = index, weight, density, numel
        self.trim: MagnitudeTrim | None = None
        self.before: ExactAbsSum | None = None
        self.after: ExactAbsSum | None = None
        self.threshold = 0.0
        self.cutoff: int | None = None
        self.keep = KEEP_ALL
        if spec.sparsify == SPARSIFY_MAGNITUDE:
            k = trim_count(density, numel)
            if k == 0:
                self.keep = KEEP_NONE
            elif k is not None:
                self.keep = KEEP_TRIM
                self.trim = MagnitudeTrim(k)
        elif spec.sparsify == SPARSIFY_RANDOM:
            if density <= 0:
                self.keep = KEEP_NONE
            elif density < 1:
                self.keep = KEEP_RANDOM
        self.rescale = rescale and self.keep in (KEEP_TRIM, KEEP_RANDOM)
        if self.rescale:
            self.before, self.after = ExactAbsSum(), ExactAbsSum()
        self.sums_done = not self.rescale
        self.factor = 1.0

    def phase(self) -> str | None:
        """The statistics phase the next pass serves (None: this model needs no more)."""
        if self.trim is not None and self.trim.pending:
            return SELECT if self.trim.selecting else TIES
        if self.sums_done:
            return None
        return AFTER if self.keep == KEEP_TRIM else RANDOM

    def wants(self, offset: int) -> bool:
        ph = self.phase()
        return ph is not None and (ph != TIES or self.trim.wants(offset))

    def kept(self) -> int:
        """Entries whose delta this model keeps: the trim's count (k unless fewer than k deltas
        are non-zero), 0 when dropped, else every entry."""
        if self.trim is not None:
            return self.trim.kept
        return 0 if self.keep == KEEP_NONE else self.numel

    def term(self) -> Term:
        return Term(self.weight, self.keep, self.threshold, self.density, self.factor, self.index,
                    self.cutoff)


class TensorMerge:
    """Classic merge of tensor `name` (numel elements) from the base and len(params.weights)
    models. seed: Philox key word of DARE's drops (patch id = model index)."""

    def __init__(self, spec: MethodSpec, params: TensorParams, name: str, numel: int,
                 seed: int = 0, model_labels: list[str] | None = None):
        self.spec, self.params, self.name, self.numel, self.seed = spec, params, name, numel, seed
        self.labels = model_labels or [f"model {i}" for i in range(len(params.weights))]
        self.models = [_ModelState(i, w, dens, spec, params.rescale, numel)
                       for i, (w, dens) in enumerate(zip(params.weights, params.densities))]
        self.stage = 0  # statistics passes closed so far

    @property
    def pending(self) -> bool:
        """True while another statistics pass is needed before merging."""
        return any(m.phase() is not None for m in self.models)

    def wants(self, offset: int) -> bool:
        """Whether the current statistics pass needs the chunk starting at `offset`."""
        return any(m.wants(offset) for m in self.models)

    def _from_x(self, m: _ModelState, x: torch.Tensor) -> bool:
        """Whether model m's statistics are just its trim (no L1 rescale sums) and the CPU
        kernels can histogram |d| straight from x and the base (|d| is never stored)."""
        return m.keep == KEEP_TRIM and not m.rescale and fused.enabled(x.numel()) and \
            fused.has_cpu_kernels(x)

    @staticmethod
    def _abs(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """float32 |float32(x) − float32(base)| of flat chunks (fused where enabled)."""
        ad = fused.abs_delta(x, base) if fused.enabled(x.numel()) else None
        if ad is None:
            ad = torch.sub(x, base.to(torch.float32)).abs_()
        return ad

    def _observe_x(self, m: _ModelState, x: torch.Tensor, base: torch.Tensor,
                   offset: int) -> None:
        """Current phase of model m on a flat chunk, |d| computed from x and base as needed."""
        if m.phase() == SELECT:
            m.trim.add_histogram(fused.abs_delta_histogram(x, base, *m.trim.pass_args()))
        else:  # TIES
            m.trim.observe_ties(offset, x.numel(), lambda s, e: self._abs(x[s:e], base[s:e]))

    def observe(self, base: torch.Tensor, xs: list[torch.Tensor], offset: int = 0) -> None:
        """Feed one chunk (flat row-major elements offset.. of the tensor) to the current pass."""
        flat = base.reshape(-1)
        for m, x in zip(self.models, xs):
            if not m.wants(offset):
                continue
            x = x.reshape(-1)
            if self._from_x(m, x):
                self._observe_x(m, x, flat, offset)
                continue
            ad = self._abs(x, flat)
            self._observe_abs(m, ad, offset)
            del ad

    def _observe_abs(self, m: _ModelState, ad: torch.Tensor, offset: int) -> None:
        """Current phase of model m on |d| of one chunk (the last phase overwrites ad)."""
        ph = m.phase()
        if ph == SELECT:
            prefix, digit = m.trim.pass_args()
            m.trim.add_histogram(ops.radix_histogram(ad, prefix, digit))
            if digit == 0 and m.rescale:
                m.before.add(ad)
        elif ph == TIES:
            m.trim.observe_ties(offset, ad.numel(), lambda s, e: ad[s:e])
        elif ph == AFTER:
            cut = local_cutoff(m.cutoff, offset, ad.numel())
            m.after.add(ad.mul_(keep_mask(ad, m.threshold, cut)))
        elif ph == RANDOM:
            m.before.add(ad)
            m.after.add(ad.mul_(retention_keep(ad.numel(), offset, self.seed, self.name,
                                               m.index, m.density, device=ad.device)))

    def end_pass(self) -> None:
        """Close the current pass (after every wanted chunk was observed)."""
        for m in self.models:
            ph = m.phase()
            if ph in (SELECT, TIES):
                try:
                    m.trim.end_pass()
                except NonFiniteValuesError:
                    raise CheckpointError(f"tensor {self.name!r} of {self.labels[m.index]}: "
                                          "NaN or inf values (cannot merge)") from None
                if not m.trim.selecting:
                    m.threshold = m.trim.threshold
                if not m.trim.pending:
                    m.cutoff = m.trim.cutoff
            elif ph in (AFTER, RANDOM):
                for acc in (m.before, m.after):
                    if acc.nonfinite:
                        raise CheckpointError(f"tensor {self.name!r} of {self.labels[m.index]}: "
                                              "NaN or inf values (cannot merge)")
                m.factor = l1_rescale_factor(m.before.value(), m.after.value())
                m.sums_done = True
        self.stage += 1

    def kept(self) -> list[int]:
        """Per model: entries whose delta is kept (after the statistics passes)."""
        return [m.kept() for m in self.models]

    def terms(self) -> list[Term]:
        if self.pending:
            raise RuntimeError(f"tensor {self.name!r}: statistics passes not finished")
        return [m.term() for m in self.models]

    def merge(self, base: torch.Tensor, xs: list[torch.Tensor], offset: int = 0,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Merged chunk (shape of base, dtype out_dtype or base's)."""
        return combine_chunk(base, xs, self.terms(), consensus=self.spec.consensus,
                             normalize=self.params.normalize, lam=self.params.lam,
                             out_dtype=out_dtype or base.dtype, seed=self.seed, name=self.name,
                             offset=offset)

    def merge_whole(self, base: torch.Tensor, xs: list[torch.Tensor],
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """All passes and the merge on tensors held whole in memory, computing each delta
        once (same bits as the chunked protocol)."""
        if fused.enabled(base.numel()):
            # |d| once per model that needs statistics (kept across its passes), then one
            # fused merge pass that recomputes d in registers: no float32 delta is stored.
            # A model that needs only its trim is histogrammed and tie-counted straight from x
            # and the base (|d| never stored whole).
            flat = base.reshape(-1)
            xs_flat = [x.reshape(-1) for x in xs]
            from_x = {m.index for m, x in zip(self.models, xs_flat) if self._from_x(m, x)}
            ads = {m.index: fused.abs_delta(x, flat) for m, x in zip(self.models, xs_flat)
                   if m.phase() is not None and m.index not in from_x}
            if all(a is not None for a in ads.values()):
                while self.pending:
                    for m, x in zip(self.models, xs_flat):
                        if not m.wants(0):
                            continue
                        if m.index in from_x:
                            self._observe_x(m, x, flat, 0)
                        else:  # (only a model's last phase overwrites its |d|)
                            self._observe_abs(m, ads[m.index], 0)
                    self.end_pass()
                del ads
                return self.merge(base, xs, 0, out_dtype)
        b = base.reshape(-1).to(torch.float32)
        need = [m.keep != KEEP_NONE for m in self.models]
        ds = [torch.sub(x.reshape(-1), b) if n else None for x, n in zip(xs, need)]
        while self.pending:
            for m, d in zip(self.models, ds):
                if m.wants(0):
                    self._observe_abs(m, d.abs(), 0)
            self.end_pass()
        return combine_deltas(b, ds, self.terms(), consensus=self.spec.consensus,
                              normalize=self.params.normalize, lam=self.params.lam,
                              out_dtype=out_dtype or base.dtype, seed=self.seed, name=self.name,
                              offset=0).reshape(base.shape)
