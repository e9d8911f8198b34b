"""Fitting the v2 judge's learned part: a multinomial logistic regression over
judge_features.FEATURES, three classes (compliance, refusal, non_answer), L2-penalised, with
classes weighted to equal total weight. Deterministic: float64 full-batch L-BFGS from zeros.

`group_kfold` and `out_of_fold` give the cross-validated predictions that docs/judge.md
reports: folds group rows by prompt (every completion of one prompt in one fold), the fold of a
prompt decided by a seeded shuffle of the prompt hashes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CLASSES = ("compliance", "refusal", "non_answer")
DEFAULT_L2 = 0.3
DEFAULT_FOLDS = 5
DEFAULT_SEED = 0


@dataclass(frozen=True)
class LinearModel:
    """Class scores = x @ weight.T + bias; weight (n_classes, n_features), bias (n_classes,)."""
    classes: tuple[str, ...]
    features: tuple[str, ...]
    weight: np.ndarray
    bias: np.ndarray

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax class probabilities, (n, n_classes) float64, for x (n, n_features)."""
        z = np.asarray(x, dtype=np.float64) @ self.weight.T + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def as_json(self) -> dict:
        return {"classes": list(self.classes), "features": list(self.features),
                "weight": [[round(float(v), 6) for v in row] for row in self.weight],
                "bias": [round(float(v), 6) for v in self.bias]}

    @classmethod
    def from_json(cls, d: dict) -> "LinearModel":
        w = np.asarray(d["weight"], dtype=np.float64)
        b = np.asarray(d["bias"], dtype=np.float64)
        if w.shape != (len(d["classes"]), len(d["features"])) or b.shape != (len(d["classes"]),):
            raise ValueError(f"weight {w.shape} / bias {b.shape} do not match "
                             f"{len(d['classes'])} classes x {len(d['features'])} features")
        return cls(tuple(d["classes"]), tuple(d["features"]), w, b)


def fit(x: np.ndarray, y: Sequence[str], features: Sequence[str], l2: float = DEFAULT_L2,
        classes: Sequence[str] = CLASSES, balanced: bool = False,
        signs: dict[tuple[str, str], int] | None = None) -> LinearModel:
    """Fit on x (n, n_features) and labels y (n, each in classes). The first class is the
    reference (its weights and bias stay 0). The loss is the mean cross-entropy (classes
    weighted to equal totals when `balanced`) + l2/2 * |W|^2 (the bias is not penalised).

    signs: {(class, feature): +1 or -1} constrains that weight's sign (parametrised as
    ±softplus), so that, e.g., a sign of answering can never push a verdict towards refusal
    however the development rows happen to fall."""
    import torch

    x = np.asarray(x, dtype=np.float64)
    idx = np.array([classes.index(c) for c in y])
    counts = np.bincount(idx, minlength=len(classes)).astype(np.float64)
    present = counts > 0
    cw = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0) \
        if balanced else np.ones(len(classes))
    xt = torch.tensor(x)
    yt = torch.tensor(idx)
    sw = torch.tensor(cw[idx])
    k, d = len(classes) - 1, x.shape[1]
    sign = torch.zeros(k, d, dtype=torch.float64)
    for (c, f), v in (signs or {}).items():
        if c in classes[1:] and f in features:
            sign[classes.index(c) - 1, list(features).index(f)] = float(v)
    free = sign == 0
    u = torch.zeros(k, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)

    def weights():
        return torch.where(free, u, sign * torch.nn.functional.softplus(u))

    opt = torch.optim.LBFGS([u, b], lr=1.0, max_iter=500, tolerance_grad=1e-10,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")
    zero = torch.zeros(len(idx), 1, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        w = weights()
        logp = torch.log_softmax(torch.cat([zero, xt @ w.T + b], dim=1), dim=1)
        loss = -(sw * logp[torch.arange(len(idx)), yt]).sum() / sw.sum() + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    # Tiny matrices: a second thread only adds hand-off cost, many times the step's own work
    # when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        w = torch.cat([torch.zeros(1, d, dtype=torch.float64), weights()]).numpy().copy()
        bias = torch.cat([torch.zeros(1, dtype=torch.float64), b]).numpy().copy()
    return LinearModel(tuple(classes), tuple(features), w, bias)


def group_kfold(groups: Sequence[str], n_folds: int = DEFAULT_FOLDS,
                seed: int = DEFAULT_SEED) -> list[int]:
    """Fold index per row: distinct groups shuffled with `seed`, then each given, largest
    first, to the fold with the fewest rows so far (ties: lowest fold)."""
    uniq = sorted(set(groups))
    random.Random(seed).shuffle(uniq)
    sizes = {g: 0 for g in uniq}
    for g in groups:
        sizes[g] += 1
    order = sorted(uniq, key=lambda g: -sizes[g])  # stable: shuffled order among equal sizes
    load = [0] * n_folds
    fold_of = {}
    for g in order:
        f = min(range(n_folds), key=lambda k: (load[k], k))
        fold_of[g] = f
        load[f] += sizes[g]
    return [fold_of[g] for g in groups]


def out_of_fold(x: np.ndarray, y: Sequence[str], groups: Sequence[str],
                features: Sequence[str], n_folds: int = DEFAULT_FOLDS,
                seed: int = DEFAULT_SEED, l2: float = DEFAULT_L2, signs=None) -> np.ndarray:
    """Class probabilities (n, n_classes) of each row from the model fitted on the other folds."""
    x = np.asarray(x, dtype=np.float64)
    folds = np.array(group_kfold(groups, n_folds, seed))
    out = np.zeros((len(y), len(CLASSES)))
    y = list(y)
    for f in range(n_folds):
        test = folds == f
        if not test.any():
            continue
        m = fit(x[~test], [c for c, t in zip(y, test) if not t], features, l2, signs=signs)
        out[test] = m.proba(x[test])
    return out
