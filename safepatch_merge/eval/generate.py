"""Batched chat-template generation with transformers, resumable per prompt.

Prompts are rendered with the tokenizer's chat template (one user turn, optional system turn),
left-padded into batches of similar length, and decoded greedily by default. Every finished
prompt is appended to a JSONL cache keyed by (model fingerprint, suite, prompt id, prompt text,
settings), so an evaluation that dies resumes where it stopped, and a changed model or setting
never reuses stale answers.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError, DataError
from .config import GenerationSettings  # noqa: F401  (decoding settings live with the configs)
from .suites import Prompt

log = logging.getLogger(__name__)


def model_fingerprint(model_path: str | Path, dtype: str = "") -> str:
    """A short hash naming a model's exact weights: the resolved directory and the name, size
    and mtime of every weight/config file (cheap: no tensor bytes read), plus the dtype."""
    p = Path(model_path)
    h = hashlib.sha256()
    if p.is_dir():
        h.update(str(p.resolve()).encode())
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".json", ".bin", ".gguf", ".model"):
                st = f.stat()
                h.update(f"{f.name}\x00{st.st_size}\x00{st.st_mtime_ns}\x00".encode())
    else:
        h.update(str(model_path).encode())
    h.update(dtype.encode())
    return h.hexdigest()[:16]


def cache_key(fingerprint: str, prompt: Prompt, settings: GenerationSettings) -> str:
    blob = json.dumps([fingerprint, prompt.suite, prompt.id, prompt.text, settings.key_fields()],
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class GenerationCache:
    """Append-only JSONL of finished generations (one object per line, with its `key`).
    A torn last line from a killed run is ignored; lines are flushed and fsynced per batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # torn write at the end of an interrupted run
                    if isinstance(rec, dict) and "key" in rec and "completion" in rec:
                        self.entries[rec["key"]] = rec

    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on the cache for a run: two evaluations appending to one
        cache would both generate every prompt. A second one fails at once."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no lock
            yield self
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(f"{self.path}: another evaluation is using this generation "
                                "cache") from None
            try:
                yield self
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            # A torn line left by a killed run must not swallow the next record.
            if f.tell() > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        f.write("\n")
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.entries[rec["key"]] = rec
            f.flush()
            os.fsync(f.fileno())


def resolve_dtype(dtype: str, device: str):
    import torch
    if dtype == "auto":
        # bf16 on GPUs that have it; fp32 on CPU, where bf16 matmuls are slow on most hosts.
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"unknown dtype '{dtype}' (auto, float32, bfloat16, float16)")
    return table[dtype]


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto",
               allow_pickle: bool = False):
    """(model, tokenizer) from a local Hugging Face model directory, for inference: eval mode,
    left padding, a pad token (eos when the tokenizer has none). Never runs remote code; the
    weights' headers are validated first, and pickle weights (pytorch_model.bin) are loaded
    (torch.load weights_only=True) only with `allow_pickle`."""
    from ..models.loading import (check_adapter_dir, check_model_dir, is_adapter_dir,
                                  load_generation_model)

    device = str(resolve_device(device))
    torch_dtype = resolve_dtype(dtype, device)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory not found")
    if is_adapter_dir(path):  # transformers loads a PEFT adapter over its base model
        check_adapter_dir(path)
    else:
        check_model_dir(path, "model", allow_pickle=allow_pickle)
    return load_generation_model(path, "model", dtype=torch_dtype, device=device,
                                 allow_pickle=allow_pickle)


def render_prompt(tok, prompt: str, settings: GenerationSettings) -> str:
    """The model input text for one prompt: chat template with the generation prompt."""
    if not settings.chat_template:
        return prompt
    if tok.chat_template is None:
        raise ConfigError("the tokenizer has no chat template; pass --no-chat-template to feed "
                          "raw prompts")
    messages = []
    if settings.system_prompt:
        messages.append({"role": "system", "content": settings.system_prompt})
    messages.append({"role": "user", "content": prompt})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _generation_config(model, tok, settings: GenerationSettings):
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens = settings.max_new_tokens
    gc.pad_token_id = tok.pad_token_id
    if gc.eos_token_id is None:
        gc.eos_token_id = tok.eos_token_id
    if settings.greedy:
        # Clear sampling defaults some models ship, so greedy decoding raises no warnings.
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    else:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = True, settings.temperature, \
            settings.top_p, None
    gc.max_length = None
    return gc


def _eos_ids(gc, tok) -> set[int]:
    eos = gc.eos_token_id if gc.eos_token_id is not None else tok.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def generate_completions(model, tok, prompts: list[Prompt], settings: GenerationSettings,
                         fingerprint: str, cache: GenerationCache | None = None,
                         batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Completions for `prompts`, in their order: dicts with key, suite, id, prompt,
    completion (decoded new text, special tokens skipped), n_new_tokens, hit_eos, cached.

    Prompts already in `cache` are not regenerated; each finished batch is appended to it.
    Batches group prompts of similar token length (longest first, so memory problems show at
    once) and are left-padded; greedy decoding unless settings say otherwise."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    keys = [cache_key(fingerprint, p, settings) for p in prompts]
    results: dict[str, dict] = {}
    todo = []
    for p, k in zip(prompts, keys):
        hit = cache.get(k) if cache is not None else None
        if hit is not None:
            results[k] = dict(hit, cached=True)
        else:
            todo.append((p, k))
    if todo:
        log.info("generating %d completions (%d cached)", len(todo), len(prompts) - len(todo))
    texts = {k: render_prompt(tok, p.text, settings) for p, k in todo}
    add_special = not settings.chat_template  # templates already hold BOS where they want it
    lengths = {k: len(tok(texts[k], add_special_tokens=add_special).input_ids) for _, k in todo}
    todo.sort(key=lambda pk: -lengths[pk[1]])
    gc = _generation_config(model, tok, settings)
    eos = _eos_ids(gc, tok)
    device = next(model.parameters()).device
    bar = tqdm(total=len(todo), desc="generate", unit="prompt", disable=not progress or not todo)
    for b, s in enumerate(range(0, len(todo), batch_size)):
        batch = todo[s:s + batch_size]
        enc = tok([texts[k] for _, k in batch], return_tensors="pt", padding=True,
                  add_special_tokens=add_special)
        enc = {k: v.to(device) for k, v in enc.items()}
        if not settings.greedy:
            torch.manual_seed(settings.seed * 1_000_003 + b)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=gc)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        recs = []
        for (p, k), ids in zip(batch, new):
            # Cut at the first EOS; padding after it is not part of the answer.
            cut = next((i for i, t in enumerate(ids) if t in eos), None)
            kept = ids if cut is None else ids[:cut]
            recs.append({"key": k, "suite": p.suite, "id": p.id, "prompt": p.text,
                         "completion": tok.decode(kept, skip_special_tokens=True),
                         "n_new_tokens": len(kept), "hit_eos": cut is not None})
        if cache is not None:
            cache.append(recs)
        for r in recs:
            results[r["key"]] = dict(r, cached=False)
        bar.update(len(batch))
    bar.close()
    return [results[k] for k in keys]
