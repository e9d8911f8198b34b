"""Merge methods: the protocol of the per-tensor functions that the streaming engine runs.

A method is a class listed in the method table (``registry.py``) against the params type its
config section parses into (``config.METHOD_PARAMS``). The engine (``engine.py``) owns all I/O,
memory budgeting, chunking, devices, output files and resume; a method only says what it needs
and computes. Life cycle, for one merge:

1. The config's method section has already been parsed and validated (``cfg.params``).
2. ``__init__(cfg)``: read the parsed parameters; no check is repeated here.
3. ``input_sources()`` -> {role: Source}: the checkpoints besides the backbone (role "base"),
   e.g. {"patch_se": Source(path), "scores_se": Source(path)}, located with
   ``cfg.locate``. The engine opens and validates them.
4. ``check_inputs(ckpts, selected)``: after opening; ckpts = {role: Checkpoint}, selected =
   backbone tensor names that pass include/exclude. Raise CheckpointError for missing tensors,
   shape or dtype mismatches (the engine already validated every file on its own).
5. ``roles_for(name)`` -> tuple of roles the per-tensor function needs for backbone tensor
   `name` (never "base": it is always given). Empty tuple: the tensor is copied from the
   backbone (cast to the output dtype if that differs).
6. ``prepare(ctx)``: optional global pre-pass (thresholds, per-tensor statistics), which may
   stream tensors through ``ctx.stream(role, names, fn)`` under the same memory budget, and
   cache results in ``ctx.work_dir`` (None in a dry run). Default: nothing.
7. ``whole_tensor(name)`` -> bool: True if ``merge_chunk`` needs the whole tensor in one call
   (e.g. a per-tensor sort); the engine then ignores the memory budget for that tensor.
   Default False: the function must be elementwise given `offset`, so any chunking of a
   tensor gives bit-identical results.
8. ``merge_chunk(name, inputs, offset, out_dtype)`` -> tensor: inputs = {"base": flat tensor,
   role: flat tensor, ...} (1-D, contiguous, their checkpoints' dtypes, on the engine's
   device; they may be modified in place), offset = index of the chunk's first element inside
   the full tensor (int64 semantics). Return a 1-D tensor of out_dtype, same length and device.
9. ``summary()`` -> dict: parameters and results (thresholds, densities) for the model card
   and provenance file; ``card_tags`` for the card's tags.

Classic merges (task arithmetic, TIES, DARE) fit as methods: task arithmetic and DARE are
elementwise (DARE's drop mask keyed by (seed, name, offset) like the retention draw); TIES's
per-tensor magnitude trim is a ``prepare`` pass computing each tensor's k-th largest |delta|
(radix histograms, like the thresholds here), after which trim / sign election / disjoint mean
are elementwise.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from .config import MergeConfig, Source
from .stream import EngineContext


class MergeMethod:
    """Base class of merge methods (see the module docstring for the protocol)."""

    card_tags: ClassVar[tuple[str, ...]] = ("merge",)

    def __init__(self, cfg: MergeConfig):
        self.cfg = cfg
        self.name = cfg.method

    def input_sources(self) -> dict[str, Source]:
        return {}

    def check_inputs(self, ckpts: dict[str, Checkpoint], selected: list[str]) -> None:
        """Raise CheckpointError for inconsistent inputs."""

    def roles_for(self, name: str) -> tuple[str, ...]:
        return ()

    def prepare(self, ctx: EngineContext) -> None:
        """Optional global pre-pass."""

    def whole_tensor(self, name: str) -> bool:
        return False

    def merge_chunk(self, name: str, inputs: dict[str, torch.Tensor], offset: int,
                    out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}



def check_shape_like_backbone(where: str, shape, backbone_shape) -> None:
    """Raise CheckpointError('<where> has shape [...] but the backbone's is [...]') on a mismatch;
    `where` names the input and tensor (e.g. "patch_se DIR: tensor 'x'")."""
    if tuple(shape) != tuple(backbone_shape):
        raise CheckpointError(f"{where} has shape {list(shape)} but the backbone's is "
                              f"{list(backbone_shape)}")
