"""Perplexity on reference answers: response tokens only, token-weighted over documents."""
import json
import math

import pytest
import torch

from safepatch_merge.errors import DataError
from safepatch_merge.eval.utility import load_reference, reference_perplexity
from safepatch_merge.testing import make_tiny_model

PAIRS = [("What is 2+2?", "2 + 2 = 4."), ("Name a colour.", "Blue is a colour of the sky."),
         ("Say hi", "Hi there! How are you doing today?")]


def test_perplexity_matches_direct_computation():
    model, tok = make_tiny_model(seed=1, dtype=torch.float64)
    model.eval()
    got = reference_perplexity(model, tok, PAIRS, batch_size=2, progress=False)
    total_nll, total_n = 0.0, 0
    for p, r in PAIRS:  # one document at a time, HF's own loss over the response tokens
        head = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True)
        p_ids = tok(head, add_special_tokens=False).input_ids
        r_ids = tok(r, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + r_ids])
        labels = ids.clone()
        labels[0, :len(p_ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        total_nll += loss * len(r_ids)
        total_n += len(r_ids)
    assert got["n_docs"] == 3 and got["n_tokens"] == total_n
    # HF's loss upcasts logits to fp32 even for a float64 model: agreement to fp32 precision.
    assert got["mean_nll"] == pytest.approx(total_nll / total_n, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(total_nll / total_n), rel=1e-6)
    lo, hi = got["ci95"]
    assert lo <= got["perplexity"] * (1 + 1e-9) and hi >= got["perplexity"] * (1 - 1e-9)


def test_truncation_limits_tokens():
    model, tok = make_tiny_model(seed=1)
    got = reference_perplexity(model, tok, PAIRS, max_response_tokens=5, progress=False)
    assert got["n_tokens"] == 15


def test_load_reference(tmp_path):
    """The packaged reference answers are the default; a user file replaces them."""
    pairs = load_reference(limit=7)
    assert len(pairs) == 7 and all(p and r for p, r in pairs)
    assert pairs[0][0] == "Name some benefits of eating healthy."
    assert len(load_reference()) == 100
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi!"}) + "\n")
    assert load_reference(own) == [("Say hi.", "Hi!")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="response"):
        load_reference(bad)
    with pytest.raises(DataError, match="not found"):
        load_reference(tmp_path / "none.jsonl")
