"""Publish a patched model directory to the Hugging Face Hub (`safepatch push`'s API twin).

The directory is checked first (push.check): nothing incomplete is ever uploaded. The upload
itself is huggingface_hub's: `upload_folder` (one commit; with hf_xet installed, huggingface_hub
>= 1.x streams it in resumable multi-commit batches by itself), or, for a large folder when
hf_xet is absent and the installed huggingface_hub still has it, `upload_large_folder`
(resumable, several commits; it keeps its state in OUT/.cache/huggingface/).
The token comes from where huggingface_hub looks (HF_TOKEN, then the `hf auth login` cache)
or the `token` argument; it is never printed or logged.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, SafepatchError
from .check import UploadFile, check_model_dir, upload_warnings

log = logging.getLogger(__name__)

LARGE_BYTES = 5 * 10**9   # above this total size a folder counts as large
LARGE_FILES = 100         # ... or above this many files


@dataclass
class PushResult:
    """What a push did (or, with dry_run, would do).

    files: the uploaded files (relative paths, sizes in bytes); total_bytes: their sum;
    method: 'upload_folder' | 'upload_large_folder'; url: the commit URL (upload_folder), the
    repository URL (upload_large_folder), or None for a dry run."""
    repo_id: str
    revision: str
    files: list[UploadFile] = field(default_factory=list)
    total_bytes: int = 0
    method: str = "upload_folder"
    dry_run: bool = False
    url: str | None = None
    warnings: list[str] = field(default_factory=list)  # see push.check.upload_warnings
    skipped: list[str] = field(default_factory=list)  # links left out (skip_untrusted)


def exact_patterns(paths: list[str]) -> list[str]:
    """fnmatch patterns that match exactly these relative paths (wildcards escaped), so an
    upload sends the checked files and nothing else."""
    return [re.sub(r"([\[\]*?])", r"[\1]", p) for p in paths]


def human_size(n: int) -> str:
    """Bytes as a short decimal string: 532 B, 12.3 kB, 269.1 MB, 14.2 GB."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def is_large(files: list[UploadFile]) -> bool:
    """More than LARGE_BYTES in total or more than LARGE_FILES files."""
    return sum(f.size for f in files) > LARGE_BYTES or len(files) > LARGE_FILES


def _xet_enabled() -> bool:
    try:
        from huggingface_hub.utils import is_xet_available
    except ImportError:  # pragma: no cover - huggingface_hub without xet support
        return False
    return bool(is_xet_available())


def choose_method(files: list[UploadFile], large: bool | None) -> str:
    """'upload_large_folder' when the folder is large (or `large` is True), hf_xet is not
    installed and huggingface_hub still offers it (it is gone in 2.x, deprecated in 1.x);
    'upload_folder' otherwise."""
    from huggingface_hub import HfApi

    want_large = is_large(files) if large is None else large
    if want_large and not _xet_enabled() and hasattr(HfApi, "upload_large_folder"):
        return "upload_large_folder"
    return "upload_folder"


def _one_line(e: BaseException, token: str | None) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if token:
        msg = msg.replace(token, "***")
    return msg[:300]


def push_model(out_dir: str | Path, repo_id: str, *, private: bool = False,
               revision: str | None = None, commit_message: str | None = None,
               dry_run: bool = False, large: bool | None = None, token: str | None = None,
               endpoint: str | None = None, skip_untrusted: bool = False) -> PushResult:
    """Upload the model directory `out_dir` to the Hub model repository `repo_id`.

    out_dir: a finished patched checkpoint (checked with push.check.check_model_dir; an
        incomplete one raises CheckpointError naming what is missing, before any network use).
    repo_id: 'namespace/name'; created if absent (`private` applies only on creation).
    revision: branch to commit to (created from main if absent); default main.
    commit_message: default 'Upload patched model with safepatch_merge'.
    dry_run: only check and list what would be uploaded; no token, no network.
    large: force (True) or forbid (False) the large-folder path; None decides by size.
    token: a Hub token; default: huggingface_hub's own lookup (HF_TOKEN, login cache).
    endpoint: Hub URL; default huggingface_hub's (HF_ENDPOINT).
    skip_untrusted: leave out links that resolve outside the directory (warned and listed in
        the result's `skipped`) instead of refusing the push (io.links).
    Only the checked files are sent (exact allow patterns): never what a link points to
    outside the directory. Dotfiles and oversized files are warned about (result.warnings).
    Returns a PushResult. Hub failures raise SafepatchError with a one-line message.
    """
    skipped: list[str] = []
    files = check_model_dir(out_dir, skip_untrusted, skipped)
    notes = upload_warnings(out_dir, files)
    for w in notes:
        log.warning("%s: %s", out_dir, w)
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"invalid repository id {repo_id!r}: {_one_line(e, None)}") from None
    branch = revision or "main"
    result = PushResult(repo_id=repo_id, revision=branch, files=files,
                        total_bytes=sum(f.size for f in files),
                        method=choose_method(files, large), dry_run=dry_run,
                        warnings=notes, skipped=skipped)
    allow = exact_patterns([f.path for f in files])
    if dry_run:
        return result

    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise SafepatchError("no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                             "(or `huggingface-cli login`)")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or "Upload patched model with safepatch_merge"
    log.info("pushing %d files (%s) from %s to %s@%s with %s", len(files),
             human_size(result.total_bytes), out_dir, repo_id, branch, result.method)
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="model").private:
            log.warning("%s already exists and is public: --private does not change it", repo_id)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        if result.method == "upload_large_folder":
            if commit_message:
                log.warning("upload_large_folder writes its own commit messages; "
                            "--commit-message is not used")
            with warnings.catch_warnings():  # deprecated in 1.x, and chosen knowingly
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                api.upload_large_folder(repo_id=repo_id, folder_path=str(out_dir),
                                        repo_type="model", revision=branch, private=private,
                                        allow_patterns=allow, print_report=False)
            result.url = str(repo_url)
        else:
            info = api.upload_folder(repo_id=repo_id, folder_path=str(out_dir),
                                     repo_type="model", revision=branch,
                                     commit_message=message, allow_patterns=allow)
            result.url = getattr(info, "commit_url", None) or str(repo_url)
    except SafepatchError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        # huggingface_hub's HTTP errors are OSErrors; its argument/LFS errors ValueErrors.
        raise SafepatchError(f"push of {out_dir} to {repo_id}@{branch} failed: "
                             f"{_one_line(e, token)}") from None
    return result
