"""The derive objectives: what each one trains on, which way its NLL guard points, which patch
it makes, and its loss on one batch (the formulas are in loss.py).

| objective | patch | data | loss | NLL guard |
|---|---|---|---|---|
| `ga` | SE | harmful pairs D_h | −mean NLL (gradient ascent; the paper's SE patch) | ceiling |
| `npo` | SE | D_h | NPO against the frozen starting model | ceiling |
| `graddiff` | SE | D_h + a retain set | −NLL(D_h) + λ·NLL(retain) | ceiling |
| `refusal_sft` | SE | (harmful prompt → refusal) pairs | +mean NLL (descent) | floor |
| `gd` | OSM | D_h | +mean NLL (descent; the paper's OSM patch) | floor |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss import graddiff_loss, npo_loss, per_example_nll, token_logprobs
# the static facts, re-exported: callers name the objectives from here
from .objective_table import OBJECTIVES, SE_OBJECTIVES, Objective  # noqa: F401


@dataclass
class StepLoss:
    """One micro-batch: `loss` to minimise (with its graph), `nll` the detached mean
    per-example response NLL of the main batch (curves and NLL guards), `extra` detached
    scalars for the curve (retain_nll, npo_loss)."""

    loss: torch.Tensor
    nll: torch.Tensor
    extra: dict


def _logits(model, batch: dict, autocast) -> torch.Tensor:
    with autocast():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def batch_loss(objective: Objective, model, batch: dict, autocast, *, ref_logp=None,
               npo_beta: float = 0.1, retain_batch: dict | None = None,
               retain_weight: float = 1.0) -> StepLoss:
    """The objective's loss on one micro-batch (see the module table).

    batch: input_ids / attention_mask / labels (B, T) int64 and `index` (B,) int64 (the
    examples' positions in the training set). ref_logp: (N,) float32 sequence
    log-likelihoods of every training example under the starting model (npo). retain_batch:
    a retain-set batch (graddiff). autocast: a context-manager factory (mixed precision).
    """
    logits = _logits(model, batch, autocast)
    lp, mask = token_logprobs(logits, batch["labels"])
    del logits
    nll = -lp.sum(dim=1) / mask.sum(dim=1)
    extra = {}
    if objective.name == "npo":
        loss = npo_loss(lp.sum(dim=1), ref_logp[batch["index"]], npo_beta)
        extra["npo_loss"] = loss.detach()
    elif objective.name == "graddiff":
        r_nll = per_example_nll(_logits(model, retain_batch, autocast), retain_batch["labels"])
        loss = graddiff_loss(nll, r_nll, retain_weight)
        extra["retain_nll"] = r_nll.detach().mean()
    elif objective.ascent:
        loss = -nll.mean()
    else:
        loss = nll.mean()
    return StepLoss(loss, nll.detach().mean(), extra)
