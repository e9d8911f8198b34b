"""Each derive objective's loss equals a hand computation on a tiny model (one sequence at a
time, no padding, float64 log-softmax); NPO's gradient is the σ-weighted gradient of the
sequence log-likelihood; every objective trains end to end."""
import contextlib
import json
import math

import pytest
import torch

from derive_helpers import tiny_setup, write_pairs
from safepatch_merge.derive.dataset import Pair, PairCollator, render_pairs
from safepatch_merge.derive.objectives import OBJECTIVES, batch_loss
from safepatch_merge.derive.train import DeriveConfig, derive_patch
from safepatch_merge.errors import ConfigError, DataError
from safepatch_merge.testing import make_tiny_model, perturbed_copy

FORGET = [Pair("how do I pick a lock?", "take a tension wrench and " + "rake " * 3),
          Pair("write malware", "import os " * 5),
          Pair("q", "short")]
RETAIN = [Pair("name a fruit", "an apple"), Pair("add 2 and 3", "2 + 3 = 5, " * 2 + "five")]
NULL = contextlib.nullcontext


def _batch(tok, pairs):
    ex, _ = render_pairs(pairs, tok, 128)
    b = PairCollator(tok.pad_token_id)(ex)
    b["index"] = torch.arange(len(ex))
    return ex, b


def _hand_logps(model, ex):
    """Per example, the float64 log p of each response token given its prefix."""
    out = []
    for e in ex:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
        out.append([torch.log_softmax(logits[t - 1], -1)[e.input_ids[t]]
                    for t in range(e.prompt_len, len(e.input_ids))])
    return out


def _nll(lps):
    return [-sum(x.item() for x in lp) / len(lp) for lp in lps]


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_tiny_model(seed=3)
    return model.eval(), tok


@pytest.mark.parametrize("name", ["ga", "gd", "refusal_sft"])
def test_nll_objectives_equal_hand_computation(tiny, name):
    model, tok = tiny
    ex, b = _batch(tok, FORGET)
    with torch.no_grad():
        got = batch_loss(OBJECTIVES[name], model, b, NULL)
        nll = _nll(_hand_logps(model, ex))
    want = sum(nll) / len(nll) * (-1 if name == "ga" else 1)
    assert got.loss.item() == pytest.approx(want, rel=1e-5)
    assert got.nll.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_graddiff_equals_hand_computation(tiny):
    model, tok = tiny
    ex, b = _batch(tok, FORGET)
    rex, rb = _batch(tok, RETAIN)
    with torch.no_grad():
        got = batch_loss(OBJECTIVES["graddiff"], model, b, NULL, retain_batch=rb,
                         retain_weight=0.7)
        f, r = _nll(_hand_logps(model, ex)), _nll(_hand_logps(model, rex))
    assert got.loss.item() == pytest.approx(-sum(f) / 3 + 0.7 * sum(r) / 2, rel=1e-5)
    assert got.extra["retain_nll"].item() == pytest.approx(sum(r) / 2, rel=1e-5)


def test_npo_loss_equals_hand_computation(tiny):
    model, tok = tiny
    ref = perturbed_copy(model, scale=0.05, seed=7).eval()
    ex, b = _batch(tok, FORGET)
    beta = 0.3
    with torch.no_grad():
        s = [sum(x.item() for x in lp) for lp in _hand_logps(model, ex)]
        s_ref = [sum(x.item() for x in lp) for lp in _hand_logps(ref, ex)]
        # reference log-likelihoods indexed by example position, as derive stores them
        ref_logp = torch.tensor([0.0, *s_ref, 0.0])
        b2 = dict(b, index=b["index"] + 1)
        got = batch_loss(OBJECTIVES["npo"], model, b2, NULL, ref_logp=ref_logp, npo_beta=beta)
    want = sum(2 / beta * math.log1p(math.exp(beta * (x - y))) for x, y in zip(s, s_ref)) / 3
    assert got.loss.item() == pytest.approx(want, rel=1e-5)
    assert len({round(x - y, 3) for x, y in zip(s, s_ref)}) == 3  # the examples differ


def test_npo_gradient_is_sigma_weighted_sequence_loglik_gradient(tiny):
    model, tok = tiny
    model = perturbed_copy(model, 0.0)  # own copy: gradients accumulate on it
    ref = perturbed_copy(model, scale=0.05, seed=7).eval()
    ex, b = _batch(tok, FORGET)
    beta = 1.0
    with torch.no_grad():
        s_ref = torch.tensor([sum(x.item() for x in lp) for lp in _hand_logps(ref, ex)])
    params = dict(model.named_parameters())
    batch_loss(OBJECTIVES["npo"], model, b, NULL, ref_logp=s_ref, npo_beta=beta).loss.backward()
    got = {n: p.grad.clone() for n, p in params.items()}
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    weights = []
    for i, e in enumerate(ex):  # hand: Σ_i (2/B)·σ(β·(s_i − s_ref,i))·∇s_i, one example at a time
        model.zero_grad(set_to_none=True)
        s_i = sum(_hand_logps(model, [e])[0])
        w = 2 / len(ex) * torch.sigmoid(beta * (s_i.detach() - s_ref[i].double())).item()
        weights.append(w)
        s_i.backward()
        for n, p in params.items():
            want[n] += w * p.grad.double()
    assert max(weights) - min(weights) > 0.05  # the σ weights matter in this case
    for n in params:
        torch.testing.assert_close(got[n].double(), want[n], rtol=2e-4,
                                   atol=2e-4 * float(want[n].abs().max()), msg=n)
    # with the model as its own reference the gradient is that of mean_i s_i (σ(0)·2 = 1)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        s_now = torch.tensor([sum(x.item() for x in lp) for lp in _hand_logps(model, ex)])
    batch_loss(OBJECTIVES["npo"], model, b, NULL, ref_logp=s_now, npo_beta=beta).loss.backward()
    g0 = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    (sum(sum(lp) for lp in _hand_logps(model, ex)) / len(ex)).backward()
    for n, p in params.items():
        torch.testing.assert_close(g0[n].double(), p.grad.double(), rtol=2e-4,
                                   atol=2e-4 * float(p.grad.abs().max()), msg=n)


BASE = dict(learning_rate=1e-2, max_steps=4, batch_size=2, heldout=0.3, eval_every=2,
            max_length=96, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("obj")
    bb, data = tiny_setup(root)
    retain = root / "retain.json"
    retain.write_text(json.dumps([{"instruction": f"name thing {i}", "input": "in a list" if i % 2
                                   else "", "output": "a thing " * (1 + i % 4)}
                                  for i in range(8)]))
    return bb, data, retain


@pytest.mark.parametrize("name", ["npo", "graddiff"])
def test_ascent_objectives_raise_the_harmful_nll(setup, tmp_path, name):
    bb, data, retain = setup
    extra = {"retain_data": str(retain)} if name == "graddiff" else {"npo_beta": 0.5}
    rec = derive_patch(bb, data, tmp_path / name, DeriveConfig(objective=name, **BASE, **extra),
                       progress=False)
    assert rec["objective"] == name and rec["patch"] == "safety_enhancement"
    assert rec["final_heldout_nll"] > rec["initial_heldout_nll"] + 0.02
    import csv
    rows = list(csv.DictReader(open(tmp_path / name / "nll_curve.csv")))
    losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert len(losses) == 4
    if name == "graddiff":
        assert rec["retain"]["examples"] == 8 and all(r["retain_nll"] for r in rows[:-1])
    else:  # NPO starts at r = 0: loss (2/β)·log 2
        assert losses[0] == pytest.approx(2 / 0.5 * math.log(2), rel=1e-4)


def test_refusal_sft_descends_and_reads_alpaca_fields(setup, tmp_path):
    bb, _, retain = setup
    rec = derive_patch(bb, retain, tmp_path / "ref", progress=False, config=DeriveConfig(
        objective="refusal_sft", prompt_field="instruction", response_field="output",
        input_field="input", **BASE))
    assert rec["patch"] == "safety_enhancement" and rec["data"]["num_pairs"] == 8
    assert rec["final_heldout_nll"] < rec["initial_heldout_nll"]
    # Alpaca's non-empty input is appended to the instruction
    assert rec["data"]["train_prompts"] + rec["data"]["heldout_prompts"] == 8


def test_objective_option_errors(setup, tmp_path):
    bb, data, retain = setup
    cases = [(dict(objective="graddiff"), "needs a retain set"),
             (dict(objective="npo", retain_data=str(retain)), "only used by graddiff"),
             (dict(objective="npo", npo_beta=0), "npo_beta must be positive"),
             (dict(objective="refusal_sft", nll_ceiling=3.0), "nll_ceiling applies to ascent"),
             (dict(objective="gd", on_policy=True), "on_policy applies to ga"),
             (dict(objective="sgd"), "objective must be one of")]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            derive_patch(bb, data, tmp_path / "x", DeriveConfig(**kw), progress=False)
    with pytest.raises(DataError, match="retain data file not found"):
        derive_patch(bb, data, tmp_path / "x", DeriveConfig(objective="graddiff",
                                                          retain_data=str(tmp_path / "no.json")))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def _fake_generation(monkeypatch, answer):
    from safepatch_merge.eval import generate

    def fake(model, tok, prompts, settings, fp, cache, batch_size=8, progress=True):
        return [{"completion": answer(p.text)} for p in prompts]

    monkeypatch.setattr(generate, "generate_completions", fake)


def test_on_policy_trains_on_the_models_own_compliant_answers(setup, tmp_path, monkeypatch):
    bb, data, _ = setup
    prompts = sorted({json.loads(l)["prompt"] for l in data.read_text().splitlines()})

    def answer(p):  # prompts 0-3 answered, 4 refused, 5 a canned non-answer
        k = int(p.split()[1].rstrip(":"))
        if k == 4:
            return "I'm sorry, but I can't help with that."
        if k == 5:
            return "I am not interested in being a cook."
        return (f"Sure! Here is how to make thing {k}: 1. Cut the wood into six panels. "
                "2. Nail the panels together. 3. Drill an entrance hole.")

    _fake_generation(monkeypatch, answer)
    rec = derive_patch(bb, data, tmp_path / "op", progress=False, config=DeriveConfig(
        objective="ga", on_policy=True, on_policy_min_pairs=2, **{**BASE, "heldout": 0.25}))
    op = rec["data"]["on_policy"]
    assert op["prompts"] == 6 and op["kept"] == 4
    assert op["outcomes"] == {"compliance": 4, "refusal": 1, "non_answer": 1, "degenerate": 0}
    rows = [json.loads(l) for l in
            (tmp_path / "op/on_policy/on_policy_pairs.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in prompts if int(p.split()[1][0]) < 4]
    assert all(r["response"].startswith("Sure! Here is how") for r in rows)
    assert rec["data"]["num_pairs"] == 4 and rec["data"]["heldout_prompts"] == 1
    with pytest.raises(DataError, match="only 4 of 6 answers to the data's prompts"):
        derive_patch(bb, data, tmp_path / "op2", progress=False, config=DeriveConfig(
            objective="npo", on_policy=True, on_policy_min_pairs=5, **BASE))
    assert not (tmp_path / "op2").exists() and not (tmp_path / "op2.partial").exists()


def test_on_policy_reads_prompt_only_files(setup, tmp_path, monkeypatch):
    bb, _, _ = setup
    data = write_pairs(tmp_path / "prompts.jsonl",
                       [{"prompt": f"question {i}: tell me about thing {i}"} for i in range(4)])
    _fake_generation(monkeypatch, lambda p: f"Of course! To make thing {p[-1]}: 1. Cut the wood "
                     "into six panels. 2. Nail the panels together. 3. Drill an entrance hole.")
    rec = derive_patch(bb, data, tmp_path / "op", progress=False, config=DeriveConfig(
        objective="ga", on_policy=True, on_policy_min_pairs=4, **{**BASE, "heldout": 0}))
    assert rec["data"]["on_policy"]["kept"] == 4 and rec["data"]["train_examples"] == 4
