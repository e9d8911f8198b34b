"""The losses of patch derivation and scoring (docs/design.md §1.2).

Per example: the mean NLL of its labelled tokens. Per batch: the mean over examples of that
(not Hugging Face's token-weighted mean). Gradient descent (OSM patch, `gd`; `refusal_sft`)
minimises +NLL, gradient ascent (SE patch, `ga`) minimises −NLL; scoring differentiates the
+NLL. Two further SE objectives:

- `npo` (negative preference optimisation, Zhang et al. 2024, arXiv 2404.05868): with the
  per-example *sequence* log-likelihood s = Σ_t log p(y_t | x, y_<t) over the response tokens
  (a sum, not a mean, as in that paper) and s_ref the same under the frozen starting model,
  L = (2/β)·mean_i softplus(β·(s_i − s_ref,i)) = −(2/β)·mean_i log σ(−β·(s_i − s_ref,i)).
  Its gradient is mean_i 2·σ(β·(s_i − s_ref,i))·∇s_i: gradient ascent on the sequence NLL whose
  weight fades as an example's likelihood falls below the reference's (β → 0 gives plain
  ascent on the summed NLL).
- `graddiff` (gradient difference): L = −mean NLL(D_h batch) + λ·mean NLL(retain batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import IGNORE_INDEX

OBJECTIVE_SIGN = {"gd": 1.0, "ga": -1.0, "refusal_sft": 1.0}


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each labelled token, mask): both (B, T-1), float32 / bool; 0 where unlabelled.

    logits: (B, T, V) any float dtype (upcast to fp32 for the log-softmax). labels: (B, T)
    int64, unshifted (token t is predicted from position t-1), IGNORE_INDEX where not scored.
    Every example must have at least one labelled token after the shift.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    B, T, V = logits.shape
    # Shift the labels, not the logits: logits[:, :-1] would be a (B·T·V) copy, the largest
    # tensor of a step, and so would its gradient.
    tgt = torch.full_like(labels, IGNORE_INDEX)
    tgt[:, :-1] = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("an example has no labelled tokens")
    tok = -F.cross_entropy(logits.reshape(-1, V).float(), tgt.clamp_min(0).reshape(-1),
                           reduction="none").view(B, T)
    return (tok * mask)[:, :-1], mask[:, :-1]


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL (nats) of each example, float32, shape (B,). Arguments as token_logprobs."""
    lp, mask = token_logprobs(logits, labels)
    return -lp.sum(dim=1) / mask.sum(dim=1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sequence log-likelihood of each example: the sum of its labelled tokens' log p (nats),
    float32, shape (B,). Arguments as token_logprobs."""
    return token_logprobs(logits, labels)[0].sum(dim=1)


def batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's examples of per-example mean token NLL (fp32 scalar)."""
    return per_example_nll(logits, labels).mean()


def objective_loss(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """sign · batch_nll: the quantity an optimizer minimises. objective: 'ga' | 'gd' |
    'refusal_sft' (descent on refusal pairs: the same loss as 'gd' on other data)."""
    return OBJECTIVE_SIGN[objective] * batch_nll(logits, labels)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO loss (2/β)·mean softplus(β·(logp − ref_logp)) (fp32 scalar).

    logp: (B,) sequence log-likelihoods under the model being trained (sequence_logprob);
    ref_logp: (B,) the same under the frozen starting model (no gradient). beta > 0.
    """
    if beta <= 0:
        raise ValueError(f"NPO beta must be positive, got {beta}")
    return (2.0 / beta) * F.softplus(beta * (logp - ref_logp.detach())).mean()


def graddiff_loss(forget_nll: torch.Tensor, retain_nll: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradient difference: −mean(forget_nll) + λ·mean(retain_nll) (fp32 scalar).

    forget_nll: (B,) per-example mean NLL on D_h; retain_nll: (B_r,) on the retain set."""
    return -forget_nll.mean() + lam * retain_nll.mean()
