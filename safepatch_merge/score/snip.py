"""SNIP saliency at the patched model, one gradient in memory at a time (docs/design.md §1.3, §2).

S = |θ_X ⊙ ∇_θ L(θ_X; D_s)| with L the mean over the scoring set of per-example mean token
NLL. For batches b of n_b examples out of N, L = Σ_b (n_b/N)·L_b with L_b the batch's mean, so
each parameter's post-accumulate-grad hook adds (n_b/N)·θ ⊙ ∇L_b into an fp32 buffer with the
fused `saliency_accumulate_` op and frees the gradient at once; |·| is taken once at the end.
Peak memory: model + score buffers + activations + one gradient, never all gradients. With
`buffers="host"` the buffers live in host memory (score/host_buffers.py) and a GPU holds
only the model, the activations and the gradients being copied down.

`accumulation="abs_per_batch"` sums (n_b/N)·|θ ⊙ ∇L_b| instead: a different, batch-size-
dependent score, offered only as a named option.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from .. import cuda_streams
from ..errors import CheckpointError, DataError
from ..ops import backend_for, saliency_accumulate_, saliency_finalize_
from ..derive.dataset import PairCollator, RenderedExample
from ..derive.loss import per_example_nll
from .config import ACCUMULATIONS, BUFFERS
from .host_buffers import HostScoreBuffers

LOSS_TARGET = {"response_nll": "response", "question_nll": "question", "prompt_nll": "prompt"}


def checkpoint_tensor_names(model_dir: str | Path) -> dict[str, tuple]:
    """{tensor name: shape} of a safetensors checkpoint directory (headers only)."""
    from safetensors import safe_open

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d} has no .safetensors files")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def scored_parameters(model, ckpt_names: dict[str, tuple], exclude: str | None = None,
                      where: str = "checkpoint") -> dict[str, torch.nn.Parameter]:
    """{checkpoint tensor name: parameter} for every floating parameter of `model`, named as it
    is stored (a tied parameter appears once, under its stored name), minus names matching the
    `exclude` regex. Raises CheckpointError if a parameter has no stored name or shape differs."""
    names_of: dict[int, list] = {}
    param_of: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        param_of[id(p)] = p
    pat = re.compile(exclude) if exclude else None
    out = {}
    for pid, names in names_of.items():
        p = param_of[pid]
        if not p.is_floating_point():
            continue
        stored = [n for n in names if n in ckpt_names]
        if not stored:
            raise CheckpointError(f"parameter {names[0]} of the loaded model is not among the "
                                  f"tensors of {where}")
        name = stored[0]
        if tuple(p.shape) != ckpt_names[name]:
            raise CheckpointError(f"tensor {name}: model shape {tuple(p.shape)} but {where} "
                                  f"stores {ckpt_names[name]}")
        if pat is not None and pat.search(name):
            continue
        out[name] = p
    if not out:
        raise CheckpointError(f"no tensor of {where} is left to score (check --exclude)")
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The elements this process holds: the local shard of an FSDP-sharded DTensor, else t."""
    return t.to_local() if hasattr(t, "to_local") else t


class SnipAccumulator:
    """fp32 score buffers plus one post-accumulate-grad hook per scored parameter.

    Set `scale` before each backward (n_b/N). Each hook adds scale·θ⊙grad (or its absolute
    value for abs_per_batch) into the parameter's buffer and sets `.grad = None`, so no
    gradient outlives its hook. buffers: 'device' keeps the buffers beside the parameters;
    'host' keeps them in host memory (:mod:`.host_buffers`), so a GPU holds no score buffer
    (for parameters on the CPU both are the same).
    Use as a context manager (hooks removed, host worker stopped on exit).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], accumulation: str = "signed",
                 buffers: str = "device"):
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        if buffers not in BUFFERS:
            raise ValueError(f"buffers must be one of {BUFFERS}, got {buffers!r}")
        self.params = params
        self.accumulation = accumulation
        self.scale = 1.0
        # Device buffers are made by each parameter's first hook call, so during the first
        # backward they appear as the activations are freed, like gradients do.
        self.scores: dict[str, torch.Tensor] = {}
        self.fired: Counter = Counter()
        # name -> the backend's saliency kernel, once the public op has validated that
        # parameter's tensors: the per-call checks and dispatch cost ~20 us, against a few us of
        # kernel for the small tensors (norms, biases) that are most of a model's parameters.
        self._checked: dict[str, object] = {}
        self._fns: dict[torch.device, object] = {}
        # On the CPU the buffers are in host memory already: 'host' changes nothing there.
        ops = cuda_streams.ops_for(next(iter(params.values())).device) if buffers == "host" else None
        self.host = HostScoreBuffers(params, ops, self._add) if ops is not None else None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(n))
                         for n, p in params.items()]

    def _add(self, name: str, score: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
             scale: float) -> None:
        """score += scale·w⊙g (signed) or scale·|w⊙g| (abs_per_batch); all on one device."""
        if self.accumulation == "signed":
            fast = self._checked.get(name)
            if fast is None:  # first call: the public op validates and picks the backend
                saliency_accumulate_(score, w, g, scale)
                self._checked[name] = self._backend_fn(score.device)
            else:  # same tensors' dtypes and layout as checked: the kernel directly
                fast(score, w, g, float(scale))
        else:
            score.add_((w.float() * g.float()).abs_(), alpha=scale)

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            with torch.no_grad():
                g = _local(p.grad).contiguous()
                if self.host is not None:
                    self.host.add(name, g, self.scale)
                else:
                    score = self.scores.get(name)
                    if score is None:
                        score = self.scores[name] = torch.zeros(g.shape, dtype=torch.float32,
                                                                device=g.device)
                    self._add(name, score, _local(p.detach()).contiguous(), g, self.scale)
            p.grad = None  # free this gradient now: one gradient alive at a time
            self.fired[name] += 1

        return hook

    def _backend_fn(self, device: torch.device):
        fn = self._fns.get(device)
        if fn is None:
            fn = self._fns[device] = backend_for(device, "saliency_accumulate_")[1].saliency_accumulate_
        return fn

    def remove(self) -> None:
        """Remove the hooks and stop the host worker (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.host is not None:
            self.host.close()

    def finalize(self, take_abs: bool = True) -> dict[str, torch.Tensor]:
        """Remove hooks; take |·| of signed sums in place; return {name: fp32 score} for every
        parameter (zeros where no gradient ever reached it), in the order of `params`, on the
        parameters' device (on the CPU with host buffers). take_abs=False returns the sums
        before |·|, to be added across processes first. For a parameter sharded by FSDP the
        score is of this process's shard."""
        if self.host is not None:
            self.scores = self.host.finish()
        self.remove()
        self.scores = {n: self.scores[n] if n in self.scores else
                       torch.zeros(_local(p).shape, dtype=torch.float32,
                                   device="cpu" if self.host is not None else p.device)
                       for n, p in self.params.items()}
        if self.accumulation == "signed" and take_abs:
            for s in self.scores.values():
                saliency_finalize_(s)
        return self.scores

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class _LossCheck:
    """Refuses a non-finite batch loss (a diverged patch) naming the batch. On the CPU the loss
    is checked at once, before its backward. On CUDA reading it would stall the launch queue
    that the scoring loop is bound by, so its finiteness is copied to pinned host memory behind
    an event and read one batch later, when that forward is long done."""

    def __init__(self, loss: str):
        self.loss, self.pending = loss, None

    def push(self, bi: int, lb: torch.Tensor) -> None:
        ok = torch.isfinite(lb.detach())
        if ok.device.type != "cuda":
            self._raise_if(bi, bool(ok))
            return
        self.finish()
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(ok, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.pending = (bi, host, ev)

    def finish(self) -> None:
        if self.pending is not None:
            bi, host, ev = self.pending
            self.pending = None
            ev.synchronize()
            self._raise_if(bi, bool(host))

    def _raise_if(self, bi: int, ok: bool) -> None:
        if not ok:
            raise CheckpointError(f"the patched model's {self.loss} is not finite on scoring "
                                  f"batch {bi} (a diverged patch?)")


def snip_scores(model, examples: list[RenderedExample], pad_token_id: int,
                params: dict[str, torch.nn.Parameter], loss: str = "response_nll",
                batch_size: int = 8, accumulation: str = "signed", progress: bool = False,
                buffers: str = "device", *, batch_ids: list[int] | None = None,
                take_abs: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """SNIP scores of `params` (from :func:`scored_parameters`) over the scoring set.

    model: a causal LM whose parameters are θ_X (any float dtype), on its device.
    examples: the scoring set D_s (rendered); loss: 'response_nll' (response tokens),
    'question_nll' (the user question's own tokens; examples rendered with
    locate_question=True) or 'prompt_nll' (every token of the rendered prompt).
    buffers: 'device' (score buffers beside the parameters) or 'host' (in host memory, fed
    from the device: less device memory, one gradient copy per batch; see host_buffers).
    batch_ids: indices of the batches (of `batch_size` consecutive examples) that this process
    scores, None = all; each still weighs its share of the whole set, so processes that score
    disjoint batches add up to the whole score (score/distributed.py). take_abs=False returns
    the sums before the final |·|, for that addition.
    Returns ({name: float32 score, shape of the parameter}, number of batches); the scores
    are on the model's device, or on the CPU with host buffers.
    Raises DataError on an empty set and CheckpointError on a non-finite loss.
    """
    if loss not in LOSS_TARGET:
        raise ValueError(f"loss must be one of {tuple(LOSS_TARGET)}, got {loss!r}")
    if not examples:
        raise DataError("the scoring set is empty")
    collate = PairCollator(pad_token_id, LOSS_TARGET[loss])
    if loss == "prompt_nll" and any(e.prompt_len < 2 for e in examples):
        raise DataError("prompt_nll needs prompts of at least 2 tokens")
    N = len(examples)
    device = next(iter(params.values())).device
    wanted = {id(p) for p in params.values()}
    was_training = model.training
    model.eval()  # no dropout: the score is a property of θ_X, not of a random mask
    saved_rg = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    batches = [examples[i:i + batch_size] for i in range(0, N, batch_size)]
    from tqdm.auto import tqdm

    check = _LossCheck(loss)
    try:
        with SnipAccumulator(params, accumulation, buffers) as acc:
            mine = range(len(batches)) if batch_ids is None else batch_ids
            for bi in tqdm(mine, disable=not progress, desc="score", unit="batch"):
                chunk = batches[bi]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                acc.scale = len(chunk) / N
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                lb = per_example_nll(logits, batch["labels"]).mean()
                check.push(bi, lb)
                del logits
                lb.backward()
                # A parameter outside the loss's graph gets no hook call: its gradient is 0.
                kept = next((n for n, p in params.items() if p.grad is not None), None)
                if kept is not None:
                    raise RuntimeError(f"gradient of {kept} survived its saliency hook")
            check.finish()
            scores = acc.finalize(take_abs)
    finally:
        for p in model.parameters():
            p.requires_grad_(saved_rg[id(p)])
            p.grad = None  # a backward stopped by an error leaves the later ones behind
        model.train(was_training)
    return scores, len(batches)


def magnitude_scores(patched: dict[str, torch.Tensor] | None, patched_dir: str | Path | None,
                     backbone_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """|θ_X − θ| per tensor in fp32 (the `magnitude` score; no gradients).

    patched: in-memory tensors by stored name (e.g. a merged LoRA model's state dict), or
    None to read them from `patched_dir`'s safetensors. The backbone is read from its files.
    """
    from safetensors import safe_open

    def locate(d):
        loc = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    loc[k] = f
        return loc

    base_loc = locate(backbone_dir)
    patch_loc = locate(patched_dir) if patched is None else None
    out = {}
    for n in names:
        if n not in base_loc:
            raise CheckpointError(f"tensor {n} is not in backbone {backbone_dir}")
        with safe_open(str(base_loc[n]), framework="pt") as h:
            b = h.get_tensor(n)
        if patched is not None:
            x = patched[n].detach().cpu()
        else:
            with safe_open(str(patch_loc[n]), framework="pt") as h:
                x = h.get_tensor(n)
        if x.shape != b.shape:
            raise CheckpointError(f"tensor {n}: patch shape {tuple(x.shape)} but backbone "
                                  f"{tuple(b.shape)}")
        out[n] = (x.to(torch.float32) - b.to(torch.float32)).abs_()
    return out
