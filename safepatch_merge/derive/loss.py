"""The one loss of patch derivation and scoring (docs/design.md §1.2), with a sign.

Per example: the mean NLL of its labelled tokens. Per batch: the mean over examples of that
(not Hugging Face's token-weighted mean). Gradient descent (OSM patch) minimises +NLL, gradient
ascent (SE patch) minimises −NLL; scoring differentiates the +NLL.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import IGNORE_INDEX

OBJECTIVE_SIGN = {"gd": 1.0, "ga": -1.0}


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL (nats) of each example, float32, shape (B,).

    logits: (B, T, V) any float dtype (upcast to fp32 for the log-softmax). labels: (B, T)
    int64, unshifted (token t is predicted from position t-1), IGNORE_INDEX where not scored.
    Every example must have at least one labelled token after the shift.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    B, T, V = logits.shape
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("an example has no labelled tokens")
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(),
                          tgt.clamp_min(0).reshape(-1), reduction="none").view(B, T - 1)
    return (tok * mask).sum(dim=1) / counts


def batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's examples of per-example mean token NLL (fp32 scalar)."""
    return per_example_nll(logits, labels).mean()


def objective_loss(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """sign · batch_nll: the quantity an optimizer minimises. objective: 'ga' | 'gd'."""
    return OBJECTIVE_SIGN[objective] * batch_nll(logits, labels)
