"""SNIP scores equal plain autograd over the whole scoring set; gradients are freed per hook."""
import copy

import pytest
import torch
from conftest import requires_cuda

from safepatch_merge.derive.dataset import Pair, PairCollator, render_pairs
from safepatch_merge.derive.loss import per_example_nll
from safepatch_merge.score.snip import SnipAccumulator, scored_parameters, snip_scores
from safepatch_merge.testing import make_tiny_model

PAIRS = [Pair(f"prompt number {i} " + "x" * (i % 3), "response " + "abc " * (1 + 3 * i % 7))
         for i in range(7)]


def _setup(tie: bool):
    model, tok = make_tiny_model(seed=1, tie_word_embeddings=tie)
    ex, _ = render_pairs(PAIRS, tok, max_length=128)
    names = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if tie:
        names.pop("lm_head.weight")  # as save_pretrained stores a tied model
    return model, tok, ex, scored_parameters(model, names)


def _autograd_scores(model, ex, pad_id, target="response", dtype=torch.float64):
    """|w ⊙ ∇L| by plain autograd: the whole set in one batch, all gradients kept."""
    m = copy.deepcopy(model).to(dtype)
    b = PairCollator(pad_id, target)(ex)
    loss = per_example_nll(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                           b["labels"]).mean()
    loss.backward()
    return {n: (p.detach() * p.grad).abs() for n, p in m.named_parameters()}


def _assert_close_scores(got, ref, rel):
    for n, s in got.items():
        r = ref[n].to(torch.float32)
        assert s.dtype == torch.float32 and s.shape == r.shape
        torch.testing.assert_close(s, r, rtol=rel, atol=rel * float(r.abs().max()), msg=n)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("batch_size", [3, 2, 7])
def test_snip_equals_plain_autograd(tie, batch_size):
    model, tok, ex, params = _setup(tie)
    scores, nb = snip_scores(model, ex, tok.pad_token_id, params, batch_size=batch_size)
    assert nb == -(-7 // batch_size)
    assert set(scores) == set(params)
    if tie:
        assert "lm_head.weight" not in scores and "model.embed_tokens.weight" in scores
    _assert_close_scores(scores, _autograd_scores(model, ex, tok.pad_token_id), 2e-5)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_prompt_nll_equals_autograd_and_differs_from_response():
    model, tok, ex, params = _setup(False)
    sp, _ = snip_scores(model, ex, tok.pad_token_id, params, loss="prompt_nll", batch_size=3)
    _assert_close_scores(sp, _autograd_scores(model, ex, tok.pad_token_id, "prompt"), 2e-5)
    sr, _ = snip_scores(model, ex, tok.pad_token_id, params, loss="response_nll", batch_size=3)
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(sp[w], sr[w], rtol=0.1)


def test_abs_per_batch_is_the_named_alternative():
    model, tok, ex, params = _setup(False)
    got, _ = snip_scores(model, ex, tok.pad_token_id, params, batch_size=3,
                         accumulation="abs_per_batch")
    ref = {n: torch.zeros_like(s, dtype=torch.float64) for n, s in got.items()}
    for i in range(0, 7, 3):
        part = ex[i:i + 3]
        for n, s in _autograd_scores(model, part, tok.pad_token_id).items():
            ref[n] += s * len(part) / 7
    _assert_close_scores(got, ref, 2e-5)
    signed, _ = snip_scores(model, ex, tok.pad_token_id, params, batch_size=3)
    w = "model.layers.1.self_attn.q_proj.weight"
    assert (got[w] >= signed[w] * (1 - 1e-5)).all() and not torch.allclose(got[w], signed[w])


def test_each_gradient_is_freed_by_its_hook():
    model, tok, ex, params = _setup(False)
    seen = []

    def checker(p):  # registered after the accumulator's hook, so it runs right after it
        seen.append(p.grad is None)
        alive = [q for q in model.parameters() if q.grad is not None]
        assert not alive, "a gradient outlived its hook"

    acc = SnipAccumulator(params, "signed")
    handles = [p.register_post_accumulate_grad_hook(checker) for p in params.values()]
    collate = PairCollator(tok.pad_token_id)
    for i in range(0, 7, 4):
        b = collate(ex[i:i + 4])
        acc.scale = len(ex[i:i + 4]) / 7
        per_example_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                        b["labels"]).mean().backward()
    for h in handles:
        h.remove()
    assert len(seen) == 2 * len(params) and all(seen)
    assert all(acc.fired[n] == 2 for n in params)
    scores = acc.finalize()
    _assert_close_scores(scores, _autograd_scores(model, ex, tok.pad_token_id), 2e-5)


def test_bf16_model_scores_in_fp32():
    model, tok, ex, _ = _setup(False)
    model = model.to(torch.bfloat16)
    params = scored_parameters(model, {n: tuple(p.shape) for n, p in model.state_dict().items()})
    scores, _ = snip_scores(model, ex, tok.pad_token_id, params, batch_size=4)
    ref = _autograd_scores(model, ex, tok.pad_token_id)  # fp64 at the bf16 weights
    for n, s in scores.items():
        assert s.dtype == torch.float32
        # bf16 activations: agreement to a few percent of the tensor's scale, not fp32 error
        torch.testing.assert_close(s, ref[n].float(), rtol=0.1, atol=0.05 * float(ref[n].abs().max()))


def test_empty_set_and_exclude():
    from safepatch_merge.errors import CheckpointError, DataError

    model, tok, ex, _ = _setup(False)
    names = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    with pytest.raises(DataError, match="empty"):
        snip_scores(model, [], tok.pad_token_id, scored_parameters(model, names))
    params = scored_parameters(model, names, exclude=r"embed_tokens|norm")
    assert "model.embed_tokens.weight" not in params and "lm_head.weight" in params
    assert not any("norm" in n for n in params)
    scores, _ = snip_scores(model, ex, tok.pad_token_id, params)
    assert set(scores) == set(params)
    names.pop("model.norm.weight")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        scored_parameters(model, names)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("buffers", ["device", "host"])
def test_snip_on_cuda_equals_plain_autograd(buffers):
    """On a GPU (hooks call the CUDA kernel, or copy down to host buffers; the loss check
    reads one batch late)."""
    model, tok, ex, _ = _setup(False)
    ref = _autograd_scores(model, ex, tok.pad_token_id)
    model = model.cuda()
    names = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    params = scored_parameters(model, names)
    scores, nb = snip_scores(model, ex, tok.pad_token_id, params, batch_size=3, buffers=buffers)
    assert nb == 3
    want = "cpu" if buffers == "host" else "cuda"
    assert all(s.device.type == want for s in scores.values())
    _assert_close_scores({n: s.cpu() for n, s in scores.items()}, ref, 2e-5)
    assert all(p.grad is None for p in model.parameters())


@requires_cuda
@pytest.mark.gpu
def test_snip_on_cuda_names_the_non_finite_batch():
    from safepatch_merge.errors import CheckpointError

    model, tok, ex, _ = _setup(False)
    model = model.cuda()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    params = scored_parameters(model, {n: tuple(p.shape) for n, p in model.state_dict().items()})
    with pytest.raises(CheckpointError, match="not finite on scoring batch 0"):
        snip_scores(model, ex, tok.pad_token_id, params, batch_size=3)
