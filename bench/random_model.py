"""A randomly initialised model with SmolLM2-135M-Instruct's shapes, for timing and memory
where the real weights cannot be brought (e.g. a GPU machine without network): cost depends
on shapes and sequence lengths, not on weight values. The tokenizer is the tests' byte-level
one (ids < 259 of the 49,152-token vocabulary), so texts give more tokens than with SmolLM2's
BPE tokenizer; --max-length caps the sequence length all the same."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent / "smollm2_135m_config.json"


def write_random_smollm2(path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a random-weight SmolLM2-135M-shaped model directory (safetensors, tiny tokenizer
    with a ChatML template) at `path`; returns the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safepatch_merge.testing import make_tiny_tokenizer, save_model_dir

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(**{**json.loads(CONFIG.read_text()), "pad_token_id": tok.pad_token_id,
                         "eos_token_id": tok.eos_token_id, "bos_token_id": None})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    return save_model_dir(model, tok, path)
