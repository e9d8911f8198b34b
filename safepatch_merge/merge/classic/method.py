"""The classic merges as one streaming-engine method (safepatch_merge.merge.methods protocol).

Config section, same grammar as mergekit's (see mergekit_config.py and docs/classic_merges.md)::

    method: ties                  # task_arithmetic | ties | dare_linear | dare_ties
    backbone: PATH                # mergekit's base_model
    models:
      - model: PATH
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0, rescale: false, int8_mask: false}
    seed: 0                       # DARE's Philox key (ours: mergekit draws from torch's RNG)

Every float tensor of the backbone (after include/exclude) is merged; the rest is copied.
Per-tensor facts (TIES's k-th largest |delta|, DARE's L1 rescale factor) need the whole
tensor: a tensor the engine streams as one chunk gets them inside ``merge_chunk`` (read once);
a tensor split into several chunks gets them in ``prepare``, streaming its chunks once per
statistics pass (:class:`.tensor_merge.TensorMerge`) under the engine's memory budget.
"""
from __future__ import annotations

import logging

import torch

from ...errors import CheckpointError
from ...io.reader import Part
from ...io.safetensors_header import FLOAT_ST
from ..config import Source
from ..mergekit_config import ClassicParams
from ..methods import MergeMethod, check_shape_like_backbone
from ..stream import row_elems
from . import fused
from .spec import METHODS, TensorParams
from .tensor_merge import TensorMerge

log = logging.getLogger("safepatch_merge.merge")


def _role(i: int) -> str:
    return f"model_{i}"


class ClassicMethod(MergeMethod):
    """task_arithmetic, ties, dare_linear and dare_ties (``cfg.method`` picks the spec)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        prm: ClassicParams = cfg.params
        self.spec = METHODS[self.name]
        self.plan = prm.plan
        self.seed = prm.seed
        self.sources: list[Source] = [cfg.locate(s) for s in self.plan.models]
        self.params: dict[str, TensorParams] = {}
        self.numel: dict[str, int] = {}
        self.prepared: dict[str, TensorMerge] = {}
        self.skipped_dtype: list[str] = []
        self._target = [[0, 0] for _ in self.sources]  # per model: sum of k, sum of N (trim)
        self._kept: dict[str, list[int]] = {}  # merged tensors: entries kept per model

    @property
    def card_tags(self) -> tuple[str, ...]:
        return ("merge", "mergekit", self.name)

    # -- inputs -----------------------------------------------------------------------------
    def input_sources(self) -> dict[str, Source]:
        return {_role(i): src for i, src in enumerate(self.sources)}

    def check_inputs(self, ckpts, selected) -> None:
        base = ckpts["base"]
        for name in selected:
            b = base.tensors[name]
            if b.dtype not in FLOAT_ST:
                if b.dtype == "F64":
                    self.skipped_dtype.append(name)
                continue
            for i in range(len(self.sources)):
                ck = ckpts[_role(i)]
                info = ck.tensors.get(name)
                where = f"{_role(i)} {ck.source}: tensor {name!r}"
                if info is None:
                    raise CheckpointError(f"{where} is missing (the backbone has it)")
                check_shape_like_backbone(where, info.shape, b.shape)
                if info.dtype not in FLOAT_ST:
                    raise CheckpointError(f"{where} has dtype {info.dtype}; models must be "
                                          "F32, BF16 or F16")
            self.params[name] = self.plan.tensor_params(name)  # ConfigError names the key
            self.numel[name] = b.numel
        if self.skipped_dtype:
            log.warning("%d float64 tensors are copied from the backbone unmerged (first: %s)",
                        len(self.skipped_dtype), self.skipped_dtype[0])
        self._warm_kernels(ckpts)

    def _warm_kernels(self, ckpts) -> None:
        """Compile the fused kernels now, on a few elements, so the memory they take is part
        of the baseline the engine sizes its chunks from (it measures before merging)."""
        big = [n for n in self.params if self.numel[n] >= fused.MIN_FUSED]
        if not big or not fused.enabled(self.numel[big[0]]):
            return
        name = big[0]
        b = ckpts["base"].tensors[name]
        out_dt = b.torch_dtype if self.cfg.output.dtype == "auto" else getattr(
            torch, self.cfg.output.dtype)
        g = torch.Generator().manual_seed(0)
        base = torch.randn(64, generator=g).to(b.torch_dtype)
        xs = [(base.float() + torch.randn(64, generator=g)).to(ckpts[_role(i)].tensors[name]
                                                                .torch_dtype)
              for i in range(len(self.sources))]
        tm = self._new(name, self.numel[name])
        for m in tm.models:  # the real tensor's kinds of terms, on a stand-in threshold
            if m.trim is not None:
                m.threshold, m.cutoff = 0.5, 32
            if m.rescale:
                m.factor = 1.5
        for m, x in zip(tm.models, xs):
            if m.phase() is not None and fused.abs_delta(x, base) is None:
                return
        terms = [m.term() for m in tm.models]
        masks = [torch.ones(64, dtype=torch.bool) if t.keep == "random" else None for t in terms]
        fused.merge(base, xs, terms, consensus=self.spec.consensus,
                    normalize=self.params[name].normalize, lam=self.params[name].lam,
                    out_dtype=out_dt, masks=masks, cuts=[32 if t.cutoff else 64 for t in terms])

    def roles_for(self, name: str) -> tuple[str, ...]:
        if name in self.params:
            return tuple(_role(i) for i in range(len(self.sources)))
        return ()

    def scratch_bytes(self, backend_name: str) -> int:
        """Temporary bytes per chunk element. Eager: base in fp32, one fp32 delta per model
        (TIES keeps them all for the sign election), masks and sums. Fused kernels (chunks of
        >= fused.MIN_FUSED elements): one fp32 |d| per model and the output. The plain-torch
        radix histogram needs int64 keys on top."""
        m = len(self.sources)
        hist = 64 if backend_name == "reference" else 0
        if fused.enabled(fused.MIN_FUSED):  # fused kernels: one float32 |d| per model
            return 16 + 5 * m + hist          # plus keep masks; no float32 deltas stored
        return 40 + 4 * m + hist

    # -- per-tensor statistics --------------------------------------------------------------
    def _new(self, name: str, numel: int) -> TensorMerge:
        return TensorMerge(self.spec, self.params[name], name, numel, self.seed,
                           [f"{_role(i)} {s.path}" for i, s in enumerate(self.sources)])

    def prepare(self, ctx) -> None:
        base = ctx.ckpts["base"]
        multi = []
        for name in base.tensors:
            if name not in self.params:
                continue
            info = base.tensors[name]
            tm = self._new(name, info.numel)
            self._count(tm)
            if tm.pending and len(ctx.chunks(info.numel, row_elems(info.shape))) > 1:
                multi.append(name)
                self.prepared[name] = tm
        roles = ["base"] + [_role(i) for i in range(len(self.sources))]
        stage = 0
        while True:
            names = [n for n in multi if self.prepared[n].pending]
            if not names:
                break

            def observe(name, views, offset):
                self.prepared[name].observe(views["base"], [views[r] for r in roles[1:]], offset)

            stage += 1
            _stream_roles(ctx, roles, names, observe, f"{self.name} statistics {stage}",
                          wants=lambda name, offset: self.prepared[name].wants(offset))
            for n in names:
                self.prepared[n].end_pass()
        for name in multi:
            self._count_kept(self.prepared[name])

    def _count(self, tm: TensorMerge) -> None:
        for i, m in enumerate(tm.models):
            self._target[i][0] += m.trim.select.k if m.trim is not None else m.kept()
            self._target[i][1] += tm.numel

    def _count_kept(self, tm: TensorMerge) -> None:
        """Record a tensor's kept entries per model (after its statistics passes)."""
        self._kept[tm.name] = tm.kept()

    # -- merge ------------------------------------------------------------------------------
    def merge_chunk(self, name, inputs, offset, out_dtype):
        xs = [inputs[_role(i)] for i in range(len(self.sources))]
        tm = self.prepared.get(name) or self._new(name, self.numel[name])
        if not tm.pending:  # elementwise from here: any chunk
            if name not in self.prepared:  # no statistics: kept = target
                self._count_kept(tm)
            return tm.merge(inputs["base"], xs, offset, out_dtype)
        if offset != 0 or inputs["base"].numel() != self.numel[name]:
            raise RuntimeError(f"tensor {name!r} arrived in chunks but was not prepared")
        out = tm.merge_whole(inputs["base"], xs, out_dtype)
        self._count_kept(tm)
        return out

    def summary(self) -> dict:
        params: dict = {"method": self.name, "seed": self.seed}
        g = self.plan.global_params
        for key in ("normalize", "rescale", "lambda", "int8_mask", "weight", "density"):
            if key in g:
                params[key] = _setting_str(g[key])
        for key, default in (("normalize", self.spec.default_normalize),
                             ("rescale", self.spec.default_rescale), ("lambda", 1.0)):
            params.setdefault(key, f"{default} (mergekit default)")
        for i, mp in enumerate(self.plan.model_params):
            for key, s in mp.items():
                params[f"{_role(i)}.{key}"] = _setting_str(s)
        out = {"parameters": params,
               "models": {role: src.path for role, src in self.input_sources().items()},
               "merged_tensors": len(self.params)}
        if self.spec.sparsify == "magnitude":
            out["trim_target_density"] = {
                _role(i): (k / n if n else 0.0) for i, (k, n) in enumerate(self._target)}
            if all(n in self._kept for n in self.params):  # (a resume skips finished tensors)
                kept = [sum(v[i] for v in self._kept.values()) for i in range(len(self.sources))]
                out["trim"] = {_role(i): {"k": k, "kept": c, "n": n,
                                          "density": c / n if n else 0.0}
                               for i, ((k, n), c) in enumerate(zip(self._target, kept))}
        if self.skipped_dtype:
            out["float64_tensors_copied"] = list(self.skipped_dtype)
        return out


def _setting_str(s) -> str:
    if len(s.conds) == 1 and s.conds[0][0] is None:
        return str(s.conds[0][1])
    return "; ".join(f"{f or '*'}: {v}" for f, v in s.conds)


def _stream_roles(ctx, roles: list[str], names: list[str], fn, desc: str,
                  wants=lambda name, offset: True) -> None:
    """Call fn(name, {role: 1-D chunk}, offset) for every chunk of `names` that
    wants(name, offset), with the same chunks of every role together (EngineContext.stream does
    one role; a per-tensor delta needs the base and each model side by side)."""
    items, meta = [], []
    for name in names:
        infos = {r: ctx.ckpts[r].tensors[name] for r in roles}
        numel = infos["base"].numel
        for off, cnt in ctx.chunks(numel, row_elems(infos["base"].shape)):
            if not wants(name, off):
                continue
            items.append([Part(r, infos[r], off, cnt) for r in roles])
            meta.append((name, off))
    ctx.stream_items(items, lambda i, views: fn(meta[i][0], views, meta[i][1]), desc)
