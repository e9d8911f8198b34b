"""The per-example-mean NLL of docs/design.md §1.2 and its sign."""
import math

import pytest
import torch

from safepatch_merge.derive.dataset import IGNORE_INDEX
from safepatch_merge.derive.loss import batch_nll, objective_loss, per_example_nll


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :5] = IGNORE_INDEX          # 2 labelled (5, 6)
    labels[1, :2] = IGNORE_INDEX          # 5 labelled
    labels[2, :3] = IGNORE_INDEX
    labels[2, 6] = IGNORE_INDEX           # 3 labelled (3, 4, 5)
    return logits, labels


def test_per_example_mean_matches_a_loop():
    logits, labels = _case()
    got = per_example_nll(logits, labels)
    assert got.dtype == torch.float32
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                 for t in range(1, 7) if labels[b, t] != IGNORE_INDEX]
        assert got[b].item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    # batch loss: mean of example means, which differs from the token-weighted mean
    assert batch_nll(logits, labels).item() == pytest.approx(got.mean().item(), rel=1e-7)
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11).float(),
                                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert not math.isclose(hf.item(), got.mean().item(), rel_tol=1e-3)


def test_sign_and_gradients():
    logits, labels = _case()
    lg = logits.float().requires_grad_()
    objective_loss(lg, labels, "ga").backward()
    g_ga = lg.grad.clone()
    lg.grad = None
    objective_loss(lg, labels, "gd").backward()
    torch.testing.assert_close(g_ga, -lg.grad)
    assert objective_loss(logits, labels, "ga").item() == pytest.approx(-batch_nll(logits, labels).item())


def test_unlabelled_example_is_rejected():
    logits, labels = _case()
    labels[1] = IGNORE_INDEX
    with pytest.raises(ValueError, match="no labelled tokens"):
        per_example_nll(logits, labels)
