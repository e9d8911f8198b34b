"""The SafePatching merge as an engine method (docs/design.md §1.4–§1.7).

Parameters: :class:`.safepatch_params.SafepatchParams` (the config section, parsed once).
Either patch may be left out (SE-only / OSM-only ablations); scores are needed for every
given patch unless mask_mode is ``none``. A tensor is patched by X iff it passes
include/exclude and is in X's score directory (mode ``none``: every float tensor of the
backbone that X's patch has). Thresholds: exact top-k per group over the scored tensors
(``prepare``; with ``retention_order: before_selection`` and retention < 1, over the retained
scores), then ``masked_merge`` per chunk.

The summary reports, per patch and group, the selected density |T_X|/N (``selection``) and
the applied density |M_X ⊙ R_X|/N, or |M_X|/N before selection (``applied``). Applied counts
come from the merge pass; each tensor's counts are appended to ``applied_counts.jsonl`` in the
work directory (and synced) before its shard can be recorded as finished, so a resumed merge
reports the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os

import torch

from ..errors import CheckpointError
from ..io.safetensors_header import FLOAT_ST
from ..ops import masked_merge
from .config import Source
from .methods import MergeMethod, check_shape_like_backbone
from .safepatch_params import SIDES, SafepatchParams
from .select import Retention, group_of
from .thresholds import compute_thresholds_many, selection_summary

log = logging.getLogger("safepatch_merge.merge")

PATCH_IDS = {"se": 0, "osm": 1}  # Philox counter word 2 of each patch's retention draw
APPLIED_FILE = "applied_counts.jsonl"


class SafepatchMethod(MergeMethod):
    card_tags = ("safepatch", "safety", "merge")

    def __init__(self, cfg):
        super().__init__(cfg)
        prm: SafepatchParams = cfg.params
        self.patch_src = {s: cfg.locate(src) for s, src in prm.patches.items()}
        self.mode = prm.mask_mode
        self.score_src = {s: cfg.locate(src) for s, src in prm.scores.items()}
        self.deltas = prm.deltas
        self.nonfinite = prm.nonfinite
        self.rate = dict(prm.top_rate)
        self.alpha = prm.alpha
        self.beta = prm.beta
        self.p = prm.retention
        self.rescale = prm.rescale
        self.granularity = prm.granularity
        self.seed = prm.seed
        self.order = prm.retention_order
        self.retention = Retention(self.order, self.p, self.seed)
        self.patched: dict[str, set[str]] = {s: set() for s in SIDES}
        self.numel: dict[str, int] = {}  # elements of every patched tensor
        self.applied: dict[str, tuple[int, int]] = {}  # finished tensors: applied SE, OSM
        self._counting: dict[str, torch.Tensor] = {}  # tensor in progress: int64 (2,) counts
        self._applied_file = None
        self.names: list[str] = []  # patched tensors, backbone order
        self._score_bytes: dict[str, int] = {}  # bytes of each side's scores of patched tensors
        self.selections: dict[str, dict] = {}
        self.thresholds: dict[str, dict[str, float]] = {s: {} for s in SIDES}
        self.skipped_nonfinite: dict[str, int] = {}

    def input_sources(self) -> dict[str, Source]:
        out = {f"patch_{s}": src for s, src in self.patch_src.items()}
        out.update({f"scores_{s}": src for s, src in self.score_src.items()})
        return out

    def check_inputs(self, ckpts, selected) -> None:
        base = ckpts["base"]
        sel = set(selected)
        for side in self.patch_src:
            patch = ckpts[f"patch_{side}"]
            scores = ckpts.get(f"scores_{side}")
            if scores is not None:
                for name, info in scores.tensors.items():
                    b = base.tensors.get(name)
                    where = f"scores_{side} {scores.source}: tensor {name!r}"
                    if b is None:
                        raise CheckpointError(f"{where} is not in the backbone")
                    check_shape_like_backbone(where, info.shape, b.shape)
                    if info.dtype not in FLOAT_ST:
                        raise CheckpointError(f"{where} has dtype {info.dtype}; scores must be "
                                              "F32, BF16 or F16")
                names = [n for n in base.tensors if n in scores.tensors and n in sel]
            else:  # mask_mode none: every float tensor the patch has
                names = [n for n in base.tensors if n in sel and n in patch.tensors]
            for name in names:
                b = base.tensors[name]
                where = f"patch_{side} {patch.source}: tensor {name!r}"
                if b.dtype not in FLOAT_ST:
                    if scores is None:
                        continue
                    raise CheckpointError(f"backbone {base.source}: tensor {name!r} has dtype "
                                          f"{b.dtype} but is scored in scores_{side}")
                info = patch.tensors.get(name)
                if info is None:
                    raise CheckpointError(f"{where} is missing" + (
                        f" (it is scored in scores_{side})" if scores is not None else ""))
                check_shape_like_backbone(where, info.shape, b.shape)
                if info.dtype not in FLOAT_ST:
                    raise CheckpointError(f"{where} has dtype {info.dtype} but the backbone's is "
                                          f"{b.dtype} (patches must be F32, BF16 or F16)")
                self.patched[side].add(name)
                self.numel[name] = b.numel
            if scores is not None:
                self._score_bytes[side] = sum(scores.tensors[n].nbytes for n in self.patched[side])
        self.names = [n for n in base.tensors if n in self.numel]

    def roles_for(self, name: str) -> tuple[str, ...]:
        roles = []
        for side in SIDES:
            if name in self.patched[side]:
                roles.append(f"patch_{side}")
                if self.mode != "none":
                    roles.append(f"scores_{side}")
        return tuple(roles)

    @property
    def retains_first(self) -> bool:
        """True when thresholds come from the retained scores (before_selection, p < 1)."""
        return self.mode != "none" and self.retention.masks_scores

    def prepare(self, ctx) -> None:
        if ctx.work_dir is not None:
            self._applied_file = ctx.work_dir / APPLIED_FILE
            self.applied.update(_read_applied(self._applied_file))
        if self.mode == "none":
            return
        if self.retains_first:
            for side in self.patch_src:
                if self.rate[side] > self.p:
                    log.warning("parameters.top_rate_%s = %g exceeds retention %g: before "
                                "selection, T_%s holds at most the retained elements, so its "
                                "density cannot reach the top rate (a shortfall in most groups)",
                                side, self.rate[side], self.p, side.upper())
        jobs = {side: (f"scores_{side}", [n for n in self.names if n in self.patched[side]],
                       self.rate[side], self.granularity, self.retention, PATCH_IDS[side])
                for side in self.patch_src}
        for side, sel in compute_thresholds_many(ctx, jobs).items():
            self.selections[side] = selection_summary(sel, with_shortfall=self.retains_first)
            self.thresholds[side] = {g: s.threshold for g, s in sel.items()}
            short = {g: s for g, s in sel.items() if s.shortfall}
            if self.retains_first and short:
                shown = sorted(short)[:20]
                more = f" and {len(short) - len(shown)} more" if len(short) > len(shown) else ""
                log.warning("retention before selection: %d group(s) of patch %s have fewer "
                            "retained positive scores than k, so T_%s is every retained positive "
                            "element there: %s%s", len(short), side, side.upper(),
                            ", ".join(f"{g} ({short[g].selected} of k={short[g].k})"
                                      for g in shown), more)

    def _threshold(self, side: str, name: str) -> float:
        if self.mode == "none" or name not in self.patched[side]:
            return math.inf
        return self.thresholds[side].get(group_of(name, self.granularity), math.inf)

    def _check_finite(self, side: str, name: str, inputs: dict, offset: int) -> None:
        patch = inputs[f"patch_{side}"]
        if patch.numel() == 0:
            return
        lo, hi = torch.aminmax(patch)  # one fast pass; NaN and ±inf show in min or max
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return
        finite = torch.isfinite(patch)
        bad = int((~finite).sum())
        src = self.patch_src[side].path
        if self.nonfinite == "error":
            first = offset + int(torch.nonzero(~finite)[0])
            raise CheckpointError(f"patch_{side} {src}: tensor {name!r} has {bad} NaN/Inf "
                                  f"values (first at element {first}); set patches.nonfinite: "
                                  "skip to keep the backbone's values there")
        if name not in self.skipped_nonfinite:
            log.warning("patch_%s %s: tensor %r has NaN/Inf values; those elements keep the "
                        "backbone's values", side, src, name)
        self.skipped_nonfinite[name] = self.skipped_nonfinite.get(name, 0) + bad
        fill = torch.zeros_like(patch) if self.deltas else inputs["base"].to(patch.dtype)
        torch.where(finite, patch, fill, out=patch)

    def merge_chunk(self, name, inputs, offset, out_dtype):
        for side in SIDES:
            if name in self.patched[side]:
                self._check_finite(side, name, inputs, offset)
        base = inputs["base"]
        counts = self._counting.get(name)
        if counts is None or offset == 0:
            counts = self._counting[name] = torch.zeros(2, dtype=torch.int64, device=base.device)
        out = masked_merge(
            base, inputs.get("patch_se"), inputs.get("patch_osm"),
            inputs.get("scores_se"), inputs.get("scores_osm"),
            t_se=self._threshold("se", name), t_osm=self._threshold("osm", name),
            mode=self.mode, alpha=self.alpha, beta=self.beta, p=self.p, rescale=self.rescale,
            seed=self.seed, name=name, offset=offset, patches_are_deltas=self.deltas,
            out_dtype=out_dtype, retention_order=self.order, applied_counts=counts)
        if offset + base.numel() >= self.numel[name]:  # the tensor's last chunk
            self._finish_tensor(name, self._counting.pop(name))
        return out

    def _finish_tensor(self, name: str, counts: torch.Tensor) -> None:
        # One host read per tensor (on a GPU: waits for its last chunk). The record reaches the
        # disk before the engine can record the tensor's shard as finished.
        se, osm = (int(v) for v in counts.tolist())
        self.applied[name] = (se, osm)
        if self._applied_file is not None:
            with open(self._applied_file, "a", encoding="utf-8") as f:
                f.write(json.dumps([name, se, osm]) + "\n")
                f.flush()
                os.fdatasync(f.fileno())

    def _applied_summary(self) -> dict:
        """{side: {groups: {g: {n, applied, density}}, n, applied, density}} over the patched
        tensors, for the sides whose every tensor has been merged (all of them after a merge)."""
        out = {}
        for side in self.patch_src:
            names = [n for n in self.names if n in self.patched[side]]
            if not names or any(n not in self.applied for n in names):
                continue
            groups: dict[str, list[int]] = {}
            for n in names:
                g = groups.setdefault(group_of(n, self.granularity), [0, 0])
                g[0] += self.numel[n]
                g[1] += self.applied[n][PATCH_IDS[side]]
            n_all, a_all = sum(v[0] for v in groups.values()), sum(v[1] for v in groups.values())
            out[side] = {"groups": {g: {"n": v[0], "applied": v[1],
                                        "density": v[1] / v[0] if v[0] else 0.0}
                                    for g, v in sorted(groups.items())},
                         "n": n_all, "applied": a_all,
                         "density": a_all / n_all if n_all else 0.0}
        return out

    def summary(self) -> dict:
        out = {
            "parameters": {"top_rate_se": self.rate["se"], "top_rate_osm": self.rate["osm"],
                           "alpha": self.alpha, "beta": self.beta, "retention": self.p,
                           "retention_order": self.order,
                           "rescale": self.rescale, "mask_mode": self.mode,
                           "granularity": self.granularity, "seed": self.seed,
                           "patch_format": "delta" if self.deltas else "full",
                           "nonfinite": self.nonfinite},
            "patched_tensors": {s: len(self.patched[s]) for s in SIDES if s in self.patch_src},
            "selection": self.selections,
            "nonfinite_skipped": dict(sorted(self.skipped_nonfinite.items())),
        }
        applied = self._applied_summary()
        if applied:
            out["applied"] = applied
        if self.retains_first:
            # the planned extra read, whatever a resume finds cached
            out["prepass"] = {"retained_histograms_bytes": sum(
                self._score_bytes[side] for side in self.patch_src)}
        return out


def _read_applied(path) -> dict[str, tuple[int, int]]:
    """Applied counts recorded by an earlier run of this merge ({} if none). A line cut short
    by a kill belongs to a tensor whose shard was not finished: it is skipped and redone."""
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            name, se, osm = json.loads(line)
        except (ValueError, TypeError):
            continue
        out[str(name)] = (int(se), int(osm))
    return out
