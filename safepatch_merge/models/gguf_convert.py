"""GGUF -> Hugging Face model directory (safetensors), dequantised.

transformers can load a GGUF file (`gguf_file=`) and dequantise it, but then refuses
`save_pretrained` ("quantized with gguf"). `convert_gguf_to_hf` writes what `save_pretrained`
would: `model.safetensors` (tied tensors written once, under the name transformers loads them
from), `config.json` without the GGUF quantisation entry, `generation_config.json` and the
tokenizer files with the chat template. The directory is built in a sibling `NAME.partial-PID`
directory and renamed into place only when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' | 'float16' | 'float32' (or the torch dtype) -> torch dtype; ConfigError else."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _tied_targets(model) -> set[str]:
    """Names of parameters that transformers re-ties on load (so they must not be saved).

    transformers 5 keeps `{target: source}` in `all_tied_weights_keys`; 4.x lists target
    names in `_tied_weights_keys`. Only honoured when the config says weights are tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "all_tied_weights_keys", None)
    if keys is None:
        keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys)


def dedup_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict with every shared (tied) tensor kept once.

    Of a group of tensors sharing storage, the one transformers does not re-tie on load is
    kept (for Llama: `model.embed_tokens.weight`, dropping `lm_head.weight`). A shared group
    with no declared tie target is an error: saving one name would lose the other on load."""
    sd = model.state_dict()
    targets = _tied_targets(model)
    groups: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        groups.setdefault(key, []).append(name)
    out = {}
    for names in groups.values():
        keep = [n for n in names if n not in targets]
        if len(keep) != 1:
            raise CheckpointError(
                f"cannot tell which of the shared tensors {names} to save (tied targets: "
                f"{sorted(targets) or 'none'})")
        out[keep[0]] = sd[keep[0]]
    # Keep the model's own order, which is what save_pretrained writes.
    return {n: out[n] for n in sd if n in out}


def _shortest_f32(v):
    """GGUF stores floats as float32 (1e-5 -> 9.999999747378752e-06); write the shortest decimal
    that rounds to the same float32, as the original config has it. The model computes with
    the float32 value either way."""
    import numpy as np

    if isinstance(v, float) and np.isfinite(v) and float(np.float32(v)) == v:
        return float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")"))
    if isinstance(v, dict):
        return {k: _shortest_f32(x) for k, x in v.items()}
    return v


def _write_config(model, out: Path, dtype: torch.dtype) -> None:
    cfg = model.config.to_diff_dict()  # what save_pretrained writes: no defaults
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "_commit_hash",
              "transformers_version"):
        cfg.pop(k, None)
    cfg = {k: _shortest_f32(v) for k, v in cfg.items()}
    cfg["architectures"] = [type(model).__name__]
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    cfg["torch_dtype"] = name  # the key transformers 4.x reads
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        # transformers 4.x reads rope_theta at the top level (and would default to 10000).
        cfg["rope_theta"] = rope["rope_theta"]
    import transformers

    cfg["transformers_version"] = transformers.__version__
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(tokenizer, out: Path, tokenizer_class: str | None,
                     model_max_length: int | None) -> None:
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    tc = json.loads(path.read_text())
    for k in ("is_local", "local_files_only", "name_or_path"):
        tc.pop(k, None)
    if tokenizer_class:
        # transformers 5 writes its generic backend class, which 4.x cannot load.
        tc["tokenizer_class"] = tokenizer_class
    if model_max_length:
        tc["model_max_length"] = model_max_length
    # GGUF runtimes detokenize without "clean-up" (which would turn "a , b" into "a, b"); some
    # transformers versions default it to true.
    tc["clean_up_tokenization_spaces"] = False
    if tokenizer.chat_template:
        # 4.x before chat_template.jinja reads the template from tokenizer_config.json.
        tc["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(tc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hf_dir(model, tokenizer, out: Path, dtype: torch.dtype,
                 tokenizer_class: str | None = None, model_max_length: int | None = None) -> None:
    """Write model (weights cast to `dtype`), config, generation config and tokenizer into the
    existing empty directory `out` (no atomicity here; see convert_gguf_to_hf)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in dedup_state_dict(model).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    # safetensors may create the file 0600; the directory is meant to be shared like any other.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)
    _write_config(model, out, dtype)
    gen = model.generation_config.to_diff_dict()
    gen.pop("transformers_version", None)
    gen = {k: v for k, v in gen.items()
           if k not in ("output_attentions", "output_hidden_states", "_from_model_config")
           and v is not None}
    import transformers

    gen["transformers_version"] = transformers.__version__
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(tokenizer, out, tokenizer_class, model_max_length)


SPECIAL_KINDS = ("bos", "eos", "unk", "pad")
_GGUF_SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                      "unk": "tokenizer.ggml.unknown_token_id",
                      "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(gguf_path: str | Path) -> dict[str, int]:
    """{'bos'|'eos'|'unk'|'pad': token id} as the GGUF's metadata states them (absent: left out).
    Reads only the metadata (the file is memory-mapped)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    out = {}
    for kind, key in _GGUF_SPECIAL_KEYS.items():
        f = reader.fields.get(key)
        if f is not None and f.data:
            out[kind] = int(f.parts[f.data[0]][0])
    return out


def _fix_special_tokens(tok, ids: dict[str, int]) -> None:
    """Set the tokenizer's special tokens from the GGUF's ids: some transformers versions
    (5.17) map them wrongly (eos = <|im_start|>, no pad) when converting a GGUF vocabulary."""
    for kind, i in ids.items():
        if 0 <= i < len(tok):
            setattr(tok, f"{kind}_token", tok.convert_ids_to_tokens(i))


def load_gguf(gguf_path: str | Path):
    """(model, tokenizer) from a GGUF file with transformers, dequantised to float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file not found: {gguf_path}")
    kw = {"gguf_file": gguf_path.name, "trust_remote_code": False}
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    except ImportError as e:  # gguf / accelerate missing
        raise CheckpointError(f"cannot read {gguf_path}: {e} (pip install 'safepatch-merge[gguf]')") from e
    ids = gguf_special_token_ids(gguf_path)
    _fix_special_tokens(tok, ids)
    for kind, i in ids.items():  # the model's own ids, in case the version mapped them wrongly
        if kind != "unk":
            setattr(model.config, f"{kind}_token_id", i)
            setattr(model.generation_config, f"{kind}_token_id", i)
    return model.eval(), tok


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path,
                       dtype: str | torch.dtype = "bfloat16",
                       tokenizer_class: str | None = None,
                       model_max_length: int | None = None,
                       extra_files: dict[str, str] | None = None) -> Path:
    """Dequantise the GGUF model at `gguf_path` into a Hugging Face model directory `out_dir`.

    Weights are written in `dtype` ('bfloat16' | 'float16' | 'float32'; dequantised in float32
    first) to one `model.safetensors`. `tokenizer_class` overrides the class name written to
    tokenizer_config.json (e.g. 'GPT2Tokenizer' so transformers 4.x loads it too).
    `extra_files` ({name: text}, e.g. a README.md model card) are written beside. The result
    appears at `out_dir` only when complete; an existing `out_dir` is an error.
    Returns `out_dir`.
    """
    from safetensors import safe_open

    dt = resolve_dtype(dtype)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"output directory already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_gguf(gguf_path)
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        write_hf_dir(model, tok, partial, dt, tokenizer_class, model_max_length)
        for name, text in (extra_files or {}).items():
            (partial / name).write_text(text)
        # What is on disk must be exactly what transformers expects to load back.
        expected = set(dedup_state_dict(model))
        with safe_open(str(partial / "model.safetensors"), "pt") as f:
            got = set(f.keys())
        if got != expected:
            raise CheckpointError(f"{partial / 'model.safetensors'}: wrote {sorted(got ^ expected)}"
                                  " unexpectedly")
        _fsync_tree(partial)
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out_dir
