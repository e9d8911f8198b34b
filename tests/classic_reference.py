"""Independent in-memory classic merges for tests: whole tensors, plain torch, a sort for
TIES's trim, written from mergekit 0.1.5's merge_group / sparsify code paths (stacked deltas,
sums over the model axis), not from safepatch_merge.merge.classic.

DARE's drop mask is the shared Philox retention stream (ops.philox.retention_mask) — the
draw is part of the spec (docs/design.md §1.6), not of the implementation under test.
"""
from __future__ import annotations

import torch

from safepatch_merge.ops.philox import retention_mask


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit sparsify.magnitude's mask by a sort: the top k = max(1, int(density·N)), ties at
    the k-th largest |delta| taken in element-index order (a stable descending argsort;
    mergekit's topk leaves their order unspecified)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(n, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool)
    k = max(1, int(density * n))
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def l1_rescale(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """mergekit's RescaleNorm.l1, with the norms summed in float64."""
    before = delta.double().abs().sum()
    after = masked.double().abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * torch.tensor(float(before / after), dtype=torch.float32)


def reference_merge(method: str, name: str, base: torch.Tensor, models: list[torch.Tensor],
                    weights: list[float], densities: list[float], *, normalize: bool,
                    rescale: bool, lam: float = 1.0, seed: int = 0,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of task_arithmetic / ties / dare_linear / dare_ties, in float32."""
    b = base.float().reshape(-1)
    n = b.numel()
    deltas = []
    for i, (x, dens) in enumerate(zip(models, densities)):
        d = x.float().reshape(-1) - b
        if method == "ties":
            if dens < 1:
                masked = d * magnitude_mask(d, dens)
                d = l1_rescale(d, masked) if rescale else masked
        elif method in ("dare_ties", "dare_linear"):
            if dens < 1:
                masked = d * retention_mask(n, 0, seed, name, i, max(dens, 0.0))
                d = l1_rescale(d, masked) if rescale else masked
        deltas.append(d)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float32).unsqueeze(-1)
    deltas = deltas * w
    if method in ("ties", "dare_ties"):
        sign = deltas.sign()
        majority = (deltas.sum(dim=0) >= 0).float() * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        div = (w * mask).sum(dim=0)
        div[div == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        div = w.sum(dim=0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return (b + mixed).to(out_dtype or base.dtype).reshape(base.shape)
