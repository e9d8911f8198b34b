"""`--saliency-on questions`: SNIP differentiates exactly the user question's own tokens of the
rendered chat template — not the system turn (a default one included), the role and turn
markers or the generation prompt."""
import copy
import json

import pytest
import torch

from derive_helpers import tiny_setup
from safepatch_merge.cli import main
from safepatch_merge.derive.dataset import (IGNORE_INDEX, Pair, PairCollator,
                                            question_token_span, render_pairs)
from safepatch_merge.derive.loss import per_example_nll
from safepatch_merge.errors import ConfigError, DataError
from safepatch_merge.score.api import ScoreConfig, score_patch
from safepatch_merge.score.snip import scored_parameters, snip_scores
from safepatch_merge.testing import make_tiny_model, make_tiny_tokenizer

# SmolLM2-Instruct's template: a default system turn when the conversation has none.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTIONS = ["How do I pick a lock?", " leading space, trailing newline\n",
             "user\nassistant: a question naming the template's own words",
             "You are a helpful AI assistant named SmolLM, trained by Hugging Face"]


def _tok():
    tok = make_tiny_tokenizer()
    tok.chat_template = SMOL_TEMPLATE
    return tok


def _hand_positions(tok, q, system=None):
    """Token positions of the question, from the template's known layout (the byte-level
    test tokenizer has no merges, so text lengths are token counts)."""
    head = f"<|im_start|>system\n{system or SYSTEM}<|im_end|>\n<|im_start|>user\n"
    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
    return list(range(n_head, n_head + len(tok(q, add_special_tokens=False)["input_ids"])))


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_question_tokens_are_exactly_the_question(system):
    tok = _tok()
    pairs = [Pair(q, "an answer") for q in QUESTIONS]
    ex, _ = render_pairs(pairs, tok, 512, system, locate_question=True)
    b = PairCollator(tok.pad_token_id, "question")(ex)
    for i, (e, q) in enumerate(zip(ex, QUESTIONS)):
        pos = (b["labels"][i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert pos == _hand_positions(tok, q, system)
        assert tok.decode([e.input_ids[k] for k in pos]) == q
        before = tok.decode(e.input_ids[:pos[0]])
        after = tok.decode(e.input_ids[pos[-1] + 1:e.prompt_len])
        assert before.endswith("<|im_start|>user\n") and (system or SYSTEM) in before
        assert after == "<|im_end|>\n<|im_start|>assistant\n"


def test_a_token_straddling_the_question_start_is_included():
    tok = _tok()
    tok.add_tokens(["\nHow"])  # crosses the template's newline and the question's first word
    ids, q0, q1 = question_token_span(tok, "How do I pick a lock?")
    assert tok.decode(ids[q0]) == "\nHow" and tok.decode(ids[q0:q1]) == "\nHow do I pick a lock?"


def test_a_template_that_rewrites_the_question_is_an_error():
    tok = _tok()
    tok.chat_template = SMOL_TEMPLATE.replace("message['content']", "message['content'] | trim")
    with pytest.raises(DataError, match="changes the question text"):
        question_token_span(tok, " padded question ")


def _autograd(model, ex, positions, dtype=torch.float64):
    m = copy.deepcopy(model).to(dtype)
    T = max(len(e.input_ids) for e in ex)
    ids = torch.zeros((len(ex), T), dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (e, pos) in enumerate(zip(ex, positions)):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        att[i, :len(e.input_ids)] = 1
        labels[i, pos] = ids[i, pos]
    per_example_nll(m(input_ids=ids, attention_mask=att).logits, labels).mean().backward()
    return {n: (p.detach() * p.grad).abs() for n, p in m.named_parameters()}


def test_snip_on_questions_equals_autograd_over_the_hand_positions():
    model, _ = make_tiny_model(seed=2)
    tok = _tok()
    pairs = [Pair(q, "some answer " * (1 + i)) for i, q in enumerate(QUESTIONS)]
    ex, _ = render_pairs(pairs, tok, 512, locate_question=True)
    params = scored_parameters(model, {n: tuple(p.shape) for n, p in model.state_dict().items()})
    got, _ = snip_scores(model, ex, tok.pad_token_id, params, loss="question_nll", batch_size=3)
    ref = _autograd(model, ex, [_hand_positions(tok, q) for q in QUESTIONS])
    for n, s in got.items():
        r = ref[n].float()
        torch.testing.assert_close(s, r, rtol=2e-5, atol=2e-5 * float(r.abs().max()), msg=n)
    whole, _ = snip_scores(model, ex, tok.pad_token_id, params, loss="prompt_nll", batch_size=3)
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(whole[w], got[w], rtol=0.1)


def test_score_patch_and_cli_saliency_on(tmp_path, capsys):
    bb, data = tiny_setup(tmp_path)  # 12 pairs, 6 distinct questions
    info = score_patch(bb, tmp_path / "q", data, bb, ScoreConfig(saliency_on="questions",
                                                                 max_length=96),
                       progress=False)
    assert info["loss"] == "question_nll" and info["options"]["saliency_on"] == "questions"
    assert info["data"]["num_examples"] == 6  # each distinct question once
    assert "not the system turn" in info["differentiated"]
    assert main(["score", str(bb), "--data", str(data), "--saliency-on", "questions", "-o",
                 str(tmp_path / "cli"), "--max-length", "96", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == "question_nll"
    assert main(["score", str(bb), "--data", str(data), "--saliency-on", "questions", "--loss",
                 "prompt_nll", "-o", str(tmp_path / "bad")]) != 0
    assert "contradicts" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="contradicts loss magnitude"):
        ScoreConfig(saliency_on="questions", loss="magnitude").validate()
    c = ScoreConfig(loss="response_nll")
    c.validate()
    assert c.saliency_on == "responses"
