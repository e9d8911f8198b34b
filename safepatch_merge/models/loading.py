"""Load causal LMs, tokenizers and LoRA adapters from local Hugging Face directories.

Never runs remote code (trust_remote_code=False) and never unpickles (safetensors only where we
read weights ourselves). Every failure a user can cause becomes a one-line SafepatchError that
names the directory at fault.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, DataError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """'float32'/'bf16'/... -> torch.dtype; 'auto' or None -> 'auto' (the checkpoint's dtype)."""
    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16") from None


def is_adapter_dir(path: str | Path) -> bool:
    """True if `path` is a PEFT adapter directory (has adapter_config.json)."""
    return (Path(path) / "adapter_config.json").is_file()


def check_model_dir(path: str | Path, what: str = "model", allow_pickle: bool = False) -> Path:
    """The path, after checking it is a directory with config.json and intact weights:
    safetensors headers validated and every file trusted by the link rule (io.links), so a
    truncated or corrupt shard is a one-line CheckpointError here, not a crash inside
    transformers. Pickle weights (pytorch_model.bin) only with `allow_pickle`."""
    from ..io.checkpoint import open_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{what} directory not found: {p}")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{what} directory {p} has no config.json")
    if any(p.glob("*.safetensors")):
        open_checkpoint(str(p), what)  # headers only; transformers then loads these
    elif (p / "pytorch_model.bin").exists() or (p / "pytorch_model.bin.index.json").exists():
        if not allow_pickle:
            open_checkpoint(str(p), what, pickle_opt_in="pass --allow-pickle")  # refuses
    else:
        raise CheckpointError(f"{what} directory {p} has no .safetensors weights")
    return p


def check_adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter directory whose safetensors weights (if any) have an intact header."""
    from ..io.links import trusted_target
    from ..io.safetensors_header import read_header

    p = Path(path)
    for f in sorted(p.glob("adapter_model*.safetensors")):
        read_header(trusted_target(f, p))
    return p


def dtype_kwarg(dtype) -> dict:
    """`dtype=` for from_pretrained on transformers >= 4.56 (v5 warns on the old name),
    `torch_dtype=` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_local(auto_class, path: str | Path, what: str, *,
               dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               allow_pickle: bool = False, tokenizer: bool = True):
    """(model, tokenizer or None): `auto_class` (a transformers Auto* model class) loaded from
    local directory `path`, in eval mode on `device`, with `dtype` ('auto': the checkpoint's).
    Never downloads, never runs remote code, and reads pickle weights (torch.load
    weights_only=True) only with `allow_pickle`. CheckpointError "<path>: cannot load
    <what> (...)" when transformers refuses the directory."""
    from transformers import AutoTokenizer

    try:
        tok = (AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                             trust_remote_code=False) if tokenizer else None)
        model = auto_class.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False,
            use_safetensors=None if allow_pickle else True, **dtype_kwarg(dtype))
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: cannot load {what} ({_one_line(e)})") from None
    return model.to(device).eval(), tok


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = "auto",
                   device: str | torch.device = "cpu"):
    """AutoModelForCausalLM from a local directory (safetensors only, no remote code), its
    headers validated first. dtype: 'auto' keeps the checkpoint's dtype; else float32 |
    bfloat16 | float16. Returns the model on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    return load_local(AutoModelForCausalLM, p, "model", dtype=parse_dtype(dtype), device=device,
                      tokenizer=False)[0]


def load_generation_model(path: str | Path, what: str, *, dtype: torch.dtype | str,
                          device: str | torch.device, allow_pickle: bool = False,
                          require_chat_template: bool = False):
    """(model, tokenizer) of a local causal LM for batched generation: load_local's model,
    and its tokenizer padding on the left with a pad token (eos when it has none).
    CheckpointError naming `path` and `what` when it cannot load, or has no chat template
    and `require_chat_template`."""
    from transformers import AutoModelForCausalLM

    model, tok = load_local(AutoModelForCausalLM, path, what, dtype=dtype, device=device,
                            allow_pickle=allow_pickle)
    if require_chat_template and tok.chat_template is None:
        raise CheckpointError(f"{path}: {what} tokenizer has no chat template")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_tokenizer(path: str | Path, require_chat_template: bool = True,
                   chat_template: str | Path | None = None):
    """AutoTokenizer from a local directory; checks (or sets) the chat template.

    chat_template: a Jinja template string or a file holding one, overriding the tokenizer's.
    Raises DataError if the tokenizer has no chat template and none is given.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load tokenizer from {p}: {_one_line(e)}") from e
    if chat_template is not None:
        ct = Path(chat_template)
        tok.chat_template = ct.read_text() if ct.is_file() else str(chat_template)
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise DataError(f"tokenizer in {p} has no chat template; pass one with --chat-template FILE")
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the
        # conventional choice and keeps the vocabulary unchanged.
        if tok.eos_token_id is None:
            raise DataError(f"tokenizer in {p} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def adapter_base_path(adapter: str | Path) -> str | None:
    """base_model_name_or_path from an adapter's adapter_config.json (may be None)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path")


def load_patched_model(path: str | Path, backbone: str | Path | None = None,
                       dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu"):
    """(model, weights_dir) of a patched model given as a full checkpoint or a LoRA adapter.

    For an adapter, the backbone (argument, else the adapter's base_model_name_or_path) is
    loaded and the adapter merged into it (W + B·A·scale), so the result is the merged weight;
    weights_dir is then the backbone's directory (whose tensor names the merged model has).
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"patched model directory not found: {p}")
    if not is_adapter_dir(p):
        return load_causal_lm(p, dtype, device), p
    check_adapter_dir(p)
    base = backbone or adapter_base_path(p)
    if not base:
        raise ConfigError(f"adapter {p} names no base model; pass --backbone")
    base_model = load_causal_lm(base, dtype, device)
    return merge_adapter(base_model, p), Path(base)


def merge_adapter(base_model, adapter: str | Path):
    """Merge a LoRA adapter directory into `base_model`; returns the plain merged model."""
    from peft import PeftModel

    try:
        pm = PeftModel.from_pretrained(base_model, str(adapter), is_trainable=False)
        merged = pm.merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"adapter {adapter} does not fit its base model: {_one_line(e)}") from e
    return merged.eval()


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg[:300] + ("..." if len(msg) > 300 else "")
