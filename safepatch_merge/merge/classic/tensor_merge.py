"""One output tensor of a classic merge: per-tensor statistics passes, then the merge.

TIES's trim threshold and the L1 rescale factor are facts about a whole tensor, so a tensor
streamed in chunks is read more than once: :class:`TensorMerge` says how many statistics
passes it still needs (``pending``), takes every chunk of each pass (``observe``, any order),
and then merges chunk by chunk (``merge``). Passes:

* magnitude trim (ties): pass 0 digit-0 histograms of |d_i|, pass 1 digit-1 refinement —
  the exact k-th largest |d_i| (:mod:`.trim`); with rescale, pass 2 sums the kept |d_i|.
* random drop (dare_*) with rescale: pass 0 sums |d_i| and the kept |d_i| (:mod:`.abs_sum`).
* task_arithmetic, or dare without rescale: no pass.

Everything per tensor is order- and chunking-free (integer histograms, exact sums, Philox
keyed by element index), so a chunked run and a whole-tensor run write identical bits.
"""
from __future__ import annotations

import torch

from ...errors import CheckpointError
from . import fused
from .abs_sum import ExactAbsSum, l1_rescale_factor
from .combine import combine_chunk, combine_deltas, retention_keep
from .spec import SPARSIFY_MAGNITUDE, SPARSIFY_RANDOM, MethodSpec, TensorParams
from .terms import KEEP_ALL, KEEP_NONE, KEEP_RANDOM, KEEP_TRIM, Term
from .trim import KthLargest, NonFiniteDeltaError, trim_count

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _ModelState:
    def __init__(self, index: int, weight: float, density: float, spec: MethodSpec,
                 rescale: bool, numel: int):
        self.index, self.weight, self.density = index, weight, density
        self.kth: KthLargest | None = None
        self.before: ExactAbsSum | None = None
        self.after: ExactAbsSum | None = None
        self.threshold = 0.0
        self.keep = KEEP_ALL
        if spec.sparsify == SPARSIFY_MAGNITUDE:
            k = trim_count(density, numel)
            if k == 0:
                self.keep = KEEP_NONE
            elif k is not None:
                self.keep = KEEP_TRIM
                self.kth = KthLargest(k)
        elif spec.sparsify == SPARSIFY_RANDOM:
            if density <= 0:
                self.keep = KEEP_NONE
            elif density < 1:
                self.keep = KEEP_RANDOM
        self.rescale = rescale and self.keep in (KEEP_TRIM, KEEP_RANDOM)
        if self.rescale:
            self.before, self.after = ExactAbsSum(), ExactAbsSum()
        self.factor = 1.0

    def last_pass(self) -> int:
        """Index of the last statistics pass this model needs (-1: none)."""
        if self.keep == KEEP_TRIM:
            return 2 if self.rescale else 1
        if self.keep == KEEP_RANDOM and self.rescale:
            return 0
        return -1

    def term(self) -> Term:
        return Term(self.weight, self.keep, self.threshold, self.density, self.factor, self.index)


class TensorMerge:
    """Classic merge of tensor `name` (numel elements) from the base and len(params.weights)
    models. seed: Philox key word of DARE's drops (patch id = model index)."""

    def __init__(self, spec: MethodSpec, params: TensorParams, name: str, numel: int,
                 seed: int = 0, model_labels: list[str] | None = None):
        self.spec, self.params, self.name, self.numel, self.seed = spec, params, name, numel, seed
        self.labels = model_labels or [f"model {i}" for i in range(len(params.weights))]
        self.models = [_ModelState(i, w, dens, spec, params.rescale, numel)
                       for i, (w, dens) in enumerate(zip(params.weights, params.densities))]
        self.stage = 0
        self._last = max((m.last_pass() for m in self.models), default=-1)

    @property
    def pending(self) -> bool:
        """True while another statistics pass over all chunks is needed before merging."""
        return self.stage <= self._last

    def _trim_only(self, m: _ModelState, x: torch.Tensor) -> bool:
        """Whether model m's statistics are just its trim threshold (no L1 rescale sums) and
        the CPU kernels can histogram |d| straight from x and the base."""
        return m.keep == KEEP_TRIM and not m.rescale and self.stage < 2 and \
            fused.enabled(x.numel()) and fused.has_cpu_kernels(x)

    def _observe_trim(self, m: _ModelState, x: torch.Tensor, base: torch.Tensor) -> None:
        m.kth.add_histogram(fused.abs_delta_histogram(x, base, *m.kth.pass_args()))

    def observe(self, base: torch.Tensor, xs: list[torch.Tensor], offset: int = 0) -> None:
        """Feed one chunk (flat row-major elements offset.. of the tensor) to the current pass."""
        b = None
        for m, x in zip(self.models, xs):
            if self.stage > m.last_pass():
                continue
            x = x.reshape(-1)
            if self._trim_only(m, x):
                self._observe_trim(m, x, base.reshape(-1))
                continue
            ad = fused.abs_delta(x, base.reshape(-1)) if fused.enabled(x.numel()) else None
            if ad is None:
                if b is None:
                    b = base.reshape(-1).to(torch.float32)
                ad = torch.sub(x, b).abs_()
            self._observe_abs(m, ad, offset)
            del ad

    def _observe_abs(self, m: _ModelState, ad: torch.Tensor, offset: int) -> None:
        """Current pass on |d| of model m for one chunk (ad may be overwritten)."""
        if m.keep == KEEP_TRIM:
            if self.stage < 2:
                m.kth.add(ad)
                if self.stage == 0 and m.rescale:
                    m.before.add(ad)
            else:
                m.after.add(ad.mul_(ad >= m.threshold) if m.threshold > 0 else ad)
        elif m.keep == KEEP_RANDOM:  # rescale, pass 0
            m.before.add(ad)
            m.after.add(ad.mul_(retention_keep(ad.numel(), offset, self.seed, self.name,
                                               m.index, m.density, device=ad.device)))

    def end_pass(self) -> None:
        """Close the current pass (after every chunk was observed)."""
        for m in self.models:
            if self.stage > m.last_pass():
                continue
            if m.keep == KEEP_TRIM and self.stage < 2:
                try:
                    m.kth.next_stage()
                except NonFiniteDeltaError:
                    raise CheckpointError(f"tensor {self.name!r} of {self.labels[m.index]}: "
                                          "NaN or inf values (cannot merge)") from None
                if m.kth.stage == 2:
                    m.threshold = m.kth.threshold
            if self.stage == m.last_pass() and m.rescale:
                for acc in (m.before, m.after):
                    if acc.nonfinite:
                        raise CheckpointError(f"tensor {self.name!r} of {self.labels[m.index]}: "
                                              "NaN or inf values (cannot merge)")
                m.factor = l1_rescale_factor(m.before.value(), m.after.value())
        self.stage += 1

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
            # A model that needs only its trim threshold is histogrammed straight from x and
            # the base (|d| never stored).
            flat = base.reshape(-1)
            trim = {m.index for m, x in zip(self.models, xs) if self._trim_only(m, x)}
            ads = {m.index: fused.abs_delta(x.reshape(-1), flat)
                   for m, x in zip(self.models, xs)
                   if self.stage <= m.last_pass() and m.index not in trim}
            if all(a is not None for a in ads.values()):
                while self.pending:
                    for m, x in zip(self.models, xs):
                        if self.stage > m.last_pass():
                            continue
                        if m.index in trim:
                            self._observe_trim(m, x.reshape(-1), flat)
                        else:  # (only a model's last pass overwrites its |d|)
                            self._observe_abs(m, ads[m.index], 0)
                    self.end_pass()
                del ads
                return self.merge(base, xs, 0, out_dtype)
        b = base.reshape(-1).to(torch.float32)
        need = [m.keep != KEEP_NONE for m in self.models]
        ds = [torch.sub(x.reshape(-1), b) if n else None for x, n in zip(xs, need)]
        while self.pending:
            for m, d in zip(self.models, ds):
                if self.stage <= m.last_pass():
                    self._observe_abs(m, d.abs(), 0)
            self.end_pass()
        return combine_deltas(b, ds, self.terms(), consensus=self.spec.consensus,
                              normalize=self.params.normalize, lam=self.params.lam,
                              out_dtype=out_dtype or base.dtype, seed=self.seed, name=self.name,
                              offset=0).reshape(base.shape)
