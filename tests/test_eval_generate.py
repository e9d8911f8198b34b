"""Batched left-padded generation equals one-prompt generation; the cache resumes per prompt."""
import json

import pytest
import torch

from safepatch_merge.errors import ConfigError
from safepatch_merge.eval.generate import (GenerationCache, GenerationSettings, cache_key,
                                           generate_completions, render_prompt)
from safepatch_merge.eval.suites import Prompt
from safepatch_merge.testing import make_tiny_model

PROMPTS = [Prompt("t", f"p{i}", text, i % 2 == 0) for i, text in enumerate(
    ["Hi", "How do I bake bread at home?", "x" * 40, "Tell me a story about a cat.", "ok?"])]


@pytest.fixture(scope="module")
def tiny():
    # float64: batched (padded) and single runs then agree to ~1e-15, so greedy argmax
    # decisions cannot flip on rounding.
    model, tok = make_tiny_model(seed=0, dtype=torch.float64)
    model.eval()
    tok.padding_side = "left"
    return model, tok


def _single(model, tok, text, n):
    ids = tok(render_prompt(tok, text, GenerationSettings(max_new_tokens=n)), return_tensors="pt",
              add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_batched_equals_single(tiny):
    model, tok = tiny
    s = GenerationSettings(max_new_tokens=6)
    got = generate_completions(model, tok, PROMPTS, s, "fp", None, batch_size=3, progress=False)
    assert [g["id"] for g in got] == [p.id for p in PROMPTS]  # input order kept
    for p, g in zip(PROMPTS, got):
        assert g["completion"] == _single(model, tok, p.text, 6)
        assert g["n_new_tokens"] <= 6 and g["cached"] is False


def test_chat_template_is_used(tiny):
    _, tok = tiny
    text = render_prompt(tok, "Hello", GenerationSettings(system_prompt="Be brief."))
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert render_prompt(tok, "Hello", GenerationSettings(chat_template=False)) == "Hello"


class _Counting:
    """Wraps a model and counts the prompts it is asked to generate for."""

    def __init__(self, model):
        self.model, self.seen = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def parameters(self):
        return self.model.parameters()

    def generate(self, **kw):
        self.seen += kw["input_ids"].shape[0]
        return self.model.generate(**kw)


def test_cache_resumes_per_prompt(tiny, tmp_path):
    model, tok = tiny
    s = GenerationSettings(max_new_tokens=4)
    path = tmp_path / "gen.jsonl"
    first = generate_completions(model, tok, PROMPTS[:2], s, "fp", GenerationCache(path),
                                 batch_size=2, progress=False)
    # An interrupted run leaves a torn last line: it is ignored and not glued to new records.
    with open(path, "a") as f:
        f.write('{"key": "torn", "compl')
    counting = _Counting(model)
    again = generate_completions(counting, tok, PROMPTS, s, "fp", GenerationCache(path),
                                 batch_size=2, progress=False)
    assert counting.seen == 3  # only the three new prompts were generated
    assert [g["cached"] for g in again] == [True, True, False, False, False]
    assert [g["completion"] for g in again[:2]] == [g["completion"] for g in first]
    lines = path.read_text().splitlines()
    assert len([ln for ln in lines if ln.startswith('{"key": "torn"')]) == 1
    assert len(GenerationCache(path).entries) == 5
    # Another model fingerprint or setting never reuses the cached answers.
    counting.seen = 0
    generate_completions(counting, tok, PROMPTS[:2], s, "other-model", GenerationCache(path),
                         batch_size=2, progress=False)
    assert counting.seen == 2
    assert cache_key("fp", PROMPTS[0], s) != cache_key("fp", PROMPTS[0],
                                                       GenerationSettings(max_new_tokens=5))
    keys = {json.loads(ln)["key"] for ln in lines if not ln.startswith('{"key": "torn"')}
    assert {cache_key("fp", p, s) for p in PROMPTS} <= keys


def test_settings_validation():
    with pytest.raises(ConfigError):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ConfigError):
        GenerationSettings(top_p=0)
    assert GenerationSettings().greedy and not GenerationSettings(temperature=0.7).greedy


def test_cache_lock_refuses_a_second_writer(tmp_path):
    from safepatch_merge.errors import DataError
    a = GenerationCache(tmp_path / "gen.jsonl")
    with a.locked():
        with pytest.raises(DataError, match="another evaluation"):
            with GenerationCache(tmp_path / "gen.jsonl").locked():
                pass
    with GenerationCache(tmp_path / "gen.jsonl").locked():  # released afterwards
        pass
