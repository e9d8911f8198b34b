"""Resolve a Hugging Face Hub id to a local snapshot directory through huggingface_hub's cache.

Only weights in safetensors form and the small config/tokenizer files are fetched; with
HF_HUB_OFFLINE=1 (or no network) only the local cache is used. Remote code is never run.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt",
                  "*.model", "*.tiktoken", "README.md"]


def snapshot(repo_id: str, role: str, revision: str | None = None,
             hint: str | None = None) -> Path:
    """Local directory of Hub model `repo_id` at `revision` (downloaded into the HF cache if
    needed and allowed). Raises CheckpointError naming `role`, the id and `hint` (where it was
    looked for as a local path)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{role} {repo_id}: huggingface_hub is not installed") from None
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all one user error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{role} {repo_id}: {hint or 'not a local directory'} and not "
                              f"available from the Hugging Face Hub ({type(e).__name__}: "
                              f"{msg[:300]})") from None
    return Path(path)
