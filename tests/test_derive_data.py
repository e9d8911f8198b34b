"""Harmful-pair loading, split by prompt, chat rendering and the collator."""
import csv
import json

import pytest

from safepatch_merge.derive.dataset import (IGNORE_INDEX, Pair, PairCollator, load_pairs,
                                            render_pairs, split_by_prompt)
from safepatch_merge.errors import CheckpointError, DataError
from safepatch_merge.models.loading import load_tokenizer
from safepatch_merge.testing import make_tiny_model_dir, make_tiny_tokenizer

ROWS = [{"instruction": "p1", "output": "r1", "x": 1}, {"instruction": "p2", "output": "r2", "x": 2}]


def test_load_formats_and_field_names(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS, "meta": 1}))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output", "x"])
        w.writeheader()
        w.writerows(ROWS)
    want = [Pair("p1", "r1"), Pair("p2", "r2")]
    for name in ("a.jsonl", "a.json", "b.json", "a.csv"):
        assert load_pairs(tmp_path / name, "instruction", "output") == want, name
    assert load_pairs(tmp_path / "a.jsonl", "instruction", "output", limit=1) == want[:1]


@pytest.mark.parametrize("content,needle", [
    ("", "no examples"),
    ('{"prompt": "p"}\n', "no field 'response'"),
    ('{"prompt": "p", "response": "  "}\n', "empty or non-text 'response'"),
    ('{"prompt": "p", "response": "r"}\n{oops\n', ":2: invalid JSON"),
])
def test_load_errors_are_one_line(tmp_path, content, needle):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_pairs(f)
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported"):
        load_pairs(tmp_path / "d.parquet")


def test_split_by_prompt_disjoint_and_exact(shared_data):
    pairs = load_pairs(shared_data / "train" / "harmful_pairs.jsonl")
    prompts = {p.prompt for p in pairs}
    assert len(pairs) == 1742 and len(prompts) == 105
    tr, he = split_by_prompt(pairs, 0.1, seed=3)
    ptr, phe = {p.prompt for p in tr}, {p.prompt for p in he}
    assert not ptr & phe and ptr | phe == prompts
    assert len(phe) == 11  # ceil(0.1 * 105)
    assert len(tr) + len(he) == len(pairs)
    assert split_by_prompt(pairs, 0.1, seed=3) == (tr, he)  # deterministic
    assert {p.prompt for p in split_by_prompt(pairs, 0.1, seed=4)[1]} != phe
    # the integer ceiling does not suffer 0.07 * 100 = 7.000000000000001
    many = [Pair(f"q{i}", "r") for i in range(100)]
    assert len(split_by_prompt(many, 0.07)[1]) == 7
    assert split_by_prompt(pairs, 0.0) == (pairs, [])


def test_render_masks_prompt_and_padding():
    tok = make_tiny_tokenizer()
    pairs = [Pair("hi there", "sure, here it is"), Pair("a longer question here", "ok")]
    ex, dropped = render_pairs(pairs, tok, max_length=512)
    assert dropped == 0
    for e, p in zip(ex, pairs):
        prompt_text = tok.apply_chat_template([{"role": "user", "content": p.prompt}],
                                              tokenize=False, add_generation_prompt=True)
        assert tok.decode(e.input_ids[:e.prompt_len]) == prompt_text
        # the response part ends at the end-of-turn token (the template's trailing newline is cut)
        assert tok.decode(e.input_ids[e.prompt_len:]) == p.response + "<|im_end|>"
    b = PairCollator(tok.pad_token_id, "response")(ex)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i, e in enumerate(ex):
        n = len(e.input_ids)
        lab = b["labels"][i]
        assert (lab[:e.prompt_len] == IGNORE_INDEX).all() and (lab[n:] == IGNORE_INDEX).all()
        assert lab[e.prompt_len:n].tolist() == list(e.input_ids[e.prompt_len:])
        assert b["attention_mask"][i].sum() == n
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all()
    bp = PairCollator(tok.pad_token_id, "prompt")(ex)
    for i, e in enumerate(ex):
        assert bp["labels"][i, :e.prompt_len].tolist() == list(e.input_ids[:e.prompt_len])
        assert (bp["labels"][i, e.prompt_len:] == IGNORE_INDEX).all()


def test_render_length_limit_truncates_response_and_drops_long_prompts():
    tok = make_tiny_tokenizer()
    ex, _ = render_pairs([Pair("q", "x" * 50)], tok)
    plen = ex[0].prompt_len
    ex, dropped = render_pairs([Pair("q", "x" * 50), Pair("q" * 40, "y")], tok, max_length=plen + 5)
    assert dropped == 1 and len(ex) == 1
    assert len(ex[0].input_ids) == plen + 5 and ex[0].prompt_len == plen


def test_template_less_tokenizer_is_an_error(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("*.jinja"):
        f.unlink()
    with pytest.raises(DataError, match="no chat template"):
        load_tokenizer(d)
    tok = load_tokenizer(d, require_chat_template=False)
    with pytest.raises(DataError, match="no chat template"):
        render_pairs([Pair("a", "b")], tok)
    # a template given explicitly fixes it
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(make_tiny_tokenizer().chat_template)
    assert load_tokenizer(d, chat_template=tmpl).chat_template == tmpl.read_text()


def test_missing_model_dir_is_checkpoint_error(tmp_path):
    from safepatch_merge.models.loading import load_causal_lm

    with pytest.raises(CheckpointError, match="not found"):
        load_causal_lm(tmp_path / "absent")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_causal_lm(tmp_path / "m")
