"""Tiny random chat models for tests and examples, built offline with transformers.

`make_tiny_model_dir(path)` writes a complete Hugging Face model directory (safetensors weights,
config, generation config, a byte-level tokenizer with a ChatML chat template) of a Llama-shaped
model small enough for unit tests (~0.1-1 MB), optionally sharded. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials, no merges) with a chat template.

    Returns a transformers PreTrainedTokenizerFast; eos = <|im_end|>, pad = <|endoftext|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def make_tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                    intermediate_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                    tie_word_embeddings: bool = False, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a random LlamaForCausalLM matching make_tiny_tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def perturbed_copy(model, scale: float = 0.01, seed: int = 1):
    """A deep copy of `model` with Gaussian noise (std `scale`) added to every parameter:
    a stand-in for a fine-tuned patch in tests."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return other


def save_model_dir(model, tokenizer, path: str | Path, max_shard_size: str | int = "10GB") -> Path:
    """save_pretrained (safetensors) of model and tokenizer into `path`; returns the path.
    A small max_shard_size (e.g. "40KB") gives a sharded checkpoint with an index."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_model_dir(path: str | Path, seed: int = 0, max_shard_size: str | int = "10GB",
                        dtype: torch.dtype = torch.float32, **kw) -> Path:
    """Write a tiny random chat model directory at `path` (see make_tiny_model)."""
    model, tok = make_tiny_model(seed=seed, dtype=dtype, **kw)
    return save_model_dir(model, tok, path, max_shard_size=max_shard_size)
