"""`safepatch score` in several processes: one score directory, the single-process definition.

SNIP (docs/design.md §1.3) is S = |Σ_b (n_b/N)·θ ⊙ ∇L_b| over the batches b of the scoring
set. Under a launcher (`torchrun`, `accelerate launch`) batch b is scored by rank b mod W, so the
ranks' shares are disjoint and together are the whole set, and the processes share the work in
one of two ways (`--parallel`):

- `data`: every rank holds the whole patched model (not wrapped in DDP: the saliency hooks free
  each gradient as it is made) and full fp32 score buffers, on the device or in host memory. It
  adds the signed, share-weighted products of its batches; rank 0 then receives the other
  ranks' sums one tensor at a time and adds them in rank order 0, 1, …, W−1 — a fixed order,
  so a run is reproducible — and takes |·| once.
- `fsdp`: the model is sharded with torch FSDP2 (`fully_shard` on every block the model names
  as unsplittable, then on the root). At step s rank r runs batch s·W + r (a zero-weight stand-in
  once its share is done), its loss scaled by n_b/N before the backward; FSDP reduce-scatters
  the sum over ranks of those gradients, and each rank's hooks add θ ⊙ g for the shards it
  owns. |·| is elementwise, so each rank takes it on its own shards; the shards are gathered to
  rank 0 one tensor at a time for writing.

Rank 0 alone writes the directory, whole. An error on any rank (a non-finite loss, a failed
write) ends every rank with the same one-line error through a collective check
(:func:`safepatch_merge.dist.agree`), so no rank waits out the timeout and no directory appears.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import dist
from ..derive.dataset import PairCollator, RenderedExample
from ..derive.loss import per_example_nll
from ..errors import CheckpointError, ConfigError, DataError
from ..ops import saliency_finalize_
from .config import PARALLEL
from .snip import LOSS_TARGET, SnipAccumulator, snip_scores


def batches_of_rank(num_batches: int, rank: int, world: int) -> list[int]:
    """Indices of the batches rank `rank` of `world` scores: b with b mod world == rank."""
    return list(range(rank, num_batches, world))


class ScoringProcesses:
    """How one `score_patch` call shares its work: a single process (every method passes
    through), or this rank's part of a data-parallel or FSDP run.

    mode: None (one process), 'data' or 'fsdp'. After :meth:`snip_scores`, `record` holds
    what score_info.json keeps of the run (mode, world size, each rank's batches)."""

    def __init__(self, mode: str | None = None, timeout_s: float = 1800.0):
        self.mode = mode
        if mode is not None:
            dist.init_process_group(timeout_s)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.record: dict | None = None

    def load_device(self, device: torch.device) -> torch.device:
        """Where to load the model: FSDP shards it from host memory onto `device`, so no device
        ever holds the whole model; otherwise `device` itself."""
        return torch.device("cpu") if self.mode == "fsdp" else device

    def prepare(self, model, device: torch.device):
        """The model to score: in 'fsdp' mode sharded with FSDP2 onto `device` (its type; the
        index is each rank's own GPU), else `model` unchanged."""
        if self.mode != "fsdp":
            return model
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise ConfigError(f"--parallel fsdp needs FSDP2 (torch >= 2.6); this is torch "
                              f"{torch.__version__}") from None

        mesh = init_device_mesh(device.type, (self.world,))
        # gradients are summed across ranks in fp32, as the single-process buffers add them
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        units = set(getattr(model, "_no_split_modules", None) or ())
        for m in list(model.modules()):
            if m is not model and type(m).__name__ in units:
                fully_shard(m, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # a sum over ranks, not FSDP's mean: the losses carry their shares n_b/N
                m.set_gradient_divide_factor(1.0)
                if hasattr(m, "set_force_sum_reduction_for_comms"):
                    m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        return model

    def together(self):
        """Context for work one rank does alone (rank 0's write): an error there ends every
        rank. A no-op in one process."""
        return dist.collective_errors() if self.mode is not None else contextlib.nullcontext()

    def snip_scores(self, model, examples: list[RenderedExample], pad_token_id: int,
                    params: dict[str, torch.nn.Parameter], cfg, progress: bool = False):
        """(scores, number of batches) as :func:`~.snip.snip_scores` returns them for the whole
        set; in several processes the scores are on rank 0 only (None elsewhere), in host
        memory for 'fsdp'. cfg: the ScoreConfig (loss, batch_size, accumulation,
        score_buffers)."""
        if self.mode is None:
            return snip_scores(model, examples, pad_token_id, params, cfg.loss, cfg.batch_size,
                               cfg.accumulation, progress, cfg.score_buffers)
        nb = math.ceil(len(examples) / cfg.batch_size) if examples else 0
        mine = batches_of_rank(nb, self.rank, self.world)
        if self.mode == "data":
            scores = self._data_parallel(model, examples, pad_token_id, params, cfg, progress, mine)
        else:
            scores = self._fsdp(model, examples, pad_token_id, params, cfg, progress)
        self.record = {"mode": self.mode, "world_size": self.world,
                       "batches_per_rank": self._gather_batch_ids(mine, nb)}
        return scores, nb

    # -- data parallel ----------------------------------------------------------------------

    def _data_parallel(self, model, examples, pad_token_id, params, cfg, progress, mine):
        err, part = None, None
        try:
            part, _ = snip_scores(model, examples, pad_token_id, params, cfg.loss, cfg.batch_size,
                                  cfg.accumulation, progress and self.main, cfg.score_buffers,
                                  batch_ids=mine, take_abs=False)
        except Exception as e:  # noqa: BLE001 - every rank learns of it below
            err = e
        dist.agree(err)
        total = self._sum_in_rank_order(part)
        if total is not None and cfg.accumulation == "signed":
            for s in total.values():
                saliency_finalize_(s)
        return total

    def _sum_in_rank_order(self, part: dict[str, torch.Tensor]) -> dict | None:
        """Rank 0: Σ_r part_r added in rank order, one tensor at a time; other ranks: None."""
        for s in part.values():
            if self.main:
                buf = torch.empty_like(s)
                for r in range(1, self.world):
                    torch.distributed.recv(buf, src=r)
                    s.add_(buf)
            else:
                torch.distributed.send(s.contiguous(), dst=0)
        return part if self.main else None

    # -- FSDP -------------------------------------------------------------------------------

    def _fsdp(self, model, examples, pad_token_id, params, cfg, progress):
        if not examples:
            raise DataError("the scoring set is empty")
        collate = PairCollator(pad_token_id, LOSS_TARGET[cfg.loss])
        N, bs = len(examples), cfg.batch_size
        nb = math.ceil(N / bs)
        steps = math.ceil(nb / self.world)
        device = next(iter(params.values())).device
        model.eval()  # no dropout, as in one process
        wanted = {id(p) for p in params.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        from tqdm.auto import tqdm

        with SnipAccumulator(params, cfg.accumulation, "device") as acc:
            acc.scale = 1.0  # each loss carries its batch's share
            for s in tqdm(range(steps), disable=not (progress and self.main), desc="score",
                          unit="step"):
                b = s * self.world + self.rank
                real = b < nb
                # a rank whose share is done still joins the step's collectives, with a
                # zero-weight one-example batch
                chunk = examples[b * bs:(b + 1) * bs] if real else examples[:1]
                err, lb = None, None
                try:
                    batch = {k: v.to(device) for k, v in collate(chunk).items()}
                    logits = model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
                    lb = per_example_nll(logits, batch["labels"]).mean()
                    del logits
                    if real and not bool(torch.isfinite(lb.detach())):
                        err = CheckpointError(f"the patched model's {cfg.loss} is not finite on "
                                              f"scoring batch {b} (a diverged patch?)")
                except Exception as e:  # noqa: BLE001 - every rank learns of it below
                    err = e
                dist.agree(err)  # every rank, every step: all go on, or all raise
                (lb * (len(chunk) / N if real else 0.0)).backward()
            if not any(acc.fired.values()):
                raise RuntimeError(f"FSDP called no saliency hook: torch {torch.__version__}'s "
                                   "FSDP2 does not run post-accumulate-grad hooks")
            local = acc.finalize()
        return self._gather_to_main(local, params)

    def _gather_to_main(self, local: dict[str, torch.Tensor], params) -> dict | None:
        """Rank 0: {name: whole fp32 score in host memory}; other ranks: None. One tensor at a
        time, assembled by DTensor from each rank's shard."""
        from torch.distributed.tensor import DTensor

        out = {} if self.main else None
        for name, s in local.items():
            p = params[name]
            if not isinstance(p, DTensor):
                raise RuntimeError(f"parameter {name} is not sharded by FSDP")
            full = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape,
                                      stride=p.stride()).full_tensor()
            if self.main:
                out[name] = full.cpu()
            del full
        return out

    # -- record -----------------------------------------------------------------------------

    def _gather_batch_ids(self, mine: list[int], nb: int) -> list[list[int]]:
        """Every rank's batch indices, as each rank reports them (for score_info.json)."""
        flags = torch.zeros(max(nb, 1), dtype=torch.int32)
        flags[mine] = 1
        parts = [torch.empty_like(flags) for _ in range(self.world)]
        torch.distributed.all_gather(parts, flags)
        return [torch.nonzero(p).flatten().tolist() for p in parts]


def scoring_processes(cfg) -> ScoringProcesses:
    """The ScoringProcesses for this process: one process unless started by a launcher with
    several (or cfg.parallel is 'fsdp'). Raises ConfigError for options that several processes
    do not support (cfg: a ScoreConfig)."""
    several = max(dist.launched_world_size(), dist.world_size()) > 1
    if not several and cfg.parallel == "data":
        return ScoringProcesses(None)
    if cfg.loss == "magnitude":
        raise ConfigError("loss magnitude takes no gradients: run it in one process, "
                          "without a launcher")
    if cfg.parallel == "fsdp":
        if cfg.score_buffers == "host":
            raise ConfigError("score buffers host are for data-parallel scoring; with --parallel "
                              "fsdp each rank holds only its shards' buffers")
        if cfg.accumulation != "signed":
            raise ConfigError("accumulation abs_per_batch needs each batch's own gradient; "
                              "--parallel fsdp sums the gradients of W batches at once")
    return ScoringProcesses(cfg.parallel, cfg.dist_timeout)


__all__ = ["PARALLEL", "ScoringProcesses", "batches_of_rank", "scoring_processes"]
