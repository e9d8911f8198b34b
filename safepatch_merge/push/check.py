"""Is a model directory complete enough to publish? (weights, config, tokenizer, model card)

`check_model_dir` refuses, with one line naming everything missing, a directory that a user
should not push: no config.json, no model card (README.md), no tokenizer files, safetensors
shards that do not match `model.safetensors.index.json` (missing, unlisted, truncated,
corrupt, or holding other tensors than the index says), or signs of an unfinished write
(`*.partial`, `*.inprogress`, the merge writer's manifest or work directory). Headers and the
index are read by the checkpoint reader (io), so a hostile header is a refusal, not a crash.

Links follow the one rule of io.links: a file that resolves outside the directory (e.g.
`passwd -> /etc/passwd`) is refused, naming it, or, with ``skip_untrusted``, left out of the
upload with a warning. `upload_warnings` names what deserves a second look before upload:
dotfiles (`.env` ...) and files much larger than the model's largest shard.
"""
from __future__ import annotations

import logging
import os
import json
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, clip
from ..io.checkpoint import read_index
from ..io.links import UntrustedLinkError, resolves_inside, trusted_target
from ..io.safetensors_header import read_header

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Left behind by an unfinished or interrupted write (safepatch_merge.io.writer and others).
PARTIAL_MARKERS = (".safepatch_manifest.json", ".safepatch_work", "*.partial", "*.partial-*",
                   "*.inprogress", "*.incomplete", "*.tmp")
# dotfiles that belong in a model repository (no warning)
EXPECTED_DOTFILES = (".gitattributes",)
LARGE_FACTOR, LARGE_FLOOR = 2, 16 << 20  # "much larger": > 2x the largest shard and > 16 MiB
# What huggingface_hub's upload_folder skips (its DEFAULT_IGNORE_PATTERNS).
_IGNORE_FALLBACK = [".git", ".git/*", "*/.git", "**/.git/**", ".cache/huggingface",
                    ".cache/huggingface/*", "*/.cache/huggingface", "**/.cache/huggingface/**"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclass(frozen=True)
class UploadFile:
    """One file to upload: `path` relative to the directory (POSIX form), `size` in bytes."""
    path: str
    size: int


def _ignore_patterns() -> list[str]:
    try:
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
        return list(DEFAULT_IGNORE_PATTERNS)
    except ImportError:  # pragma: no cover - layout of other huggingface_hub versions
        return _IGNORE_FALLBACK


def list_upload_files(out_dir: str | Path, skip_untrusted: bool = False,
                      skipped: list[str] | None = None) -> list[UploadFile]:
    """Every regular file under `out_dir` that upload_folder would send, sorted by path,
    each trusted by the link rule (io.links): a link resolving outside the directory raises
    UntrustedLinkError naming it, or with `skip_untrusted` is left out (its path appended to
    `skipped`, with a warning). Linked directories are not descended (upload_folder does not
    follow them either), but one that points outside is refused or skipped the same way."""
    root = Path(out_dir)
    ignore = _ignore_patterns()
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = d / name
            rel = p.relative_to(root).as_posix()
            if any(fnmatch(rel, pat) for pat in ignore) or (name in dirnames
                                                             and not p.is_symlink()):
                continue
            if not resolves_inside(p, root):
                msg = f"{root}: {rel} links to {os.path.realpath(p)}, outside the directory"
                if not skip_untrusted:
                    raise UntrustedLinkError(msg + "; refusing to upload what it points to "
                                             "(remove it, or pass --skip-untrusted-links)")
                log.warning("%s; not uploaded", msg)
                if skipped is not None:
                    skipped.append(rel)
                continue
            if p.is_dir():
                log.warning("%s: %s is a linked directory; not uploaded", root, rel)
            elif p.is_file():  # FIFOs, sockets, devices, dangling links: never uploaded
                files.append(UploadFile(rel, p.stat().st_size))
    return sorted(files, key=lambda f: f.path)


def upload_warnings(root: str | Path, files: list[UploadFile]) -> list[str]:
    """What to look at before uploading `files` (from `root`): dotfiles other than
    .gitattributes (a stray .env or credential file), and non-weight files much larger
    (> 2x and > 16 MiB) than the model's largest safetensors file."""
    out = []
    for f in files:
        parts = PurePosixPath(f.path).parts
        if any(p.startswith(".") for p in parts) and f.path not in EXPECTED_DOTFILES:
            out.append(f"{f.path} is a dotfile (hidden files often hold credentials); check "
                       "that it belongs in the upload")
    shards = [f.size for f in files if f.path.endswith(".safetensors")]
    largest = max(shards, default=0)
    for f in files:
        if not f.path.endswith(".safetensors") and f.size > max(LARGE_FACTOR * largest,
                                                                  LARGE_FLOOR):
            out.append(f"{f.path} ({f.size} bytes) is much larger than the model's largest "
                       f"shard ({largest} bytes); check that it belongs in the upload")
    return out


def _safetensors_problem(path: Path, expected: set[str] | None, root: Path) -> str | None:
    """None if `path` is a safetensors file the checkpoint reader accepts (header intact,
    tensors tiling the data exactly) and, if `expected` is given, holding exactly those
    tensors; else what is wrong."""
    try:
        header = read_header(trusted_target(path, root))
    except CheckpointError as e:
        return f"{path.name}: {str(e).replace(str(path) + ': ', '', 1)}"
    if expected is not None and set(header.tensors) != expected:
        diff = sorted(set(header.tensors) ^ expected)
        return (f"{path.name} holds other tensors than {INDEX} lists "
                f"({len(diff)} differ, e.g. {clip(diff[0], 200)})")
    return None


def _weights_problems(root: Path, names: set[str]) -> list[str]:
    problems = []
    on_disk = {n for n in names if n.endswith(".safetensors") and "/" not in n}
    if INDEX in names:
        try:
            weight_map = read_index(root / INDEX)
        except CheckpointError as e:
            return [f"a readable {INDEX} ({str(e).replace(str(root / INDEX) + ': ', '', 1)})"]
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            pp = PurePosixPath(shard)
            if pp.is_absolute() or ".." in pp.parts or shard.startswith("\\"):
                return [f"{INDEX} names a shard outside the directory: {clip(shard, 200)}"]
            shards.setdefault(shard, set()).add(tensor)
        missing = sorted(s for s in shards if s not in names)
        if missing:
            problems.append(f"shard {clip(', '.join(missing), 300)[1:-1]} (listed in {INDEX})")
        unlisted = sorted(on_disk - set(shards))
        if unlisted:
            problems.append(f"an index entry for {clip(', '.join(unlisted), 300)[1:-1]} "
                            f"(not in {INDEX})")
        for shard in sorted(set(shards) - set(missing)):
            bad = _safetensors_problem(root / shard, shards[shard], root)
            if bad:
                problems.append(f"an intact shard: {bad}")
    elif SINGLE in names:
        bad = _safetensors_problem(root / SINGLE, None, root)
        if bad:
            problems.append(f"an intact {SINGLE}: {bad}")
        extra = sorted(on_disk - {SINGLE})
        if extra:
            problems.append(f"an index for the extra shards {', '.join(extra)}")
    else:
        problems.append(f"weights ({SINGLE} or {INDEX} with its shards)")
    return problems


def check_model_dir(out_dir: str | Path, skip_untrusted: bool = False,
                    skipped: list[str] | None = None) -> list[UploadFile]:
    """The files to upload from the model directory `out_dir`, after checking it is complete.

    Required: config.json (valid JSON), safetensors weights (one model.safetensors, or the
    shards of model.safetensors.index.json, each with an intact header holding exactly the
    tensors the index assigns it), tokenizer_config.json plus a tokenizer file
    (tokenizer.json, tokenizer.model, vocab.json or tiktoken.model), and a non-empty README.md
    (the model card). Raises CheckpointError naming everything missing on one line, and
    UntrustedLinkError for a link that points outside (see list_upload_files for
    `skip_untrusted` and `skipped`).
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise CheckpointError(f"model directory not found: {root}")
    if any(fnmatch(root.name, pat) for pat in ("*.partial", "*.partial-*")):
        raise CheckpointError(f"{root} is an unfinished output (a .partial directory); push the "
                              "finished directory instead")
    files = list_upload_files(root, skip_untrusted, skipped)
    names = {f.path for f in files}
    ignore = _ignore_patterns()  # e.g. upload_large_folder's own state in .cache/huggingface
    markers = sorted({rel for pat in PARTIAL_MARKERS for p in root.rglob(pat)
                      if not any(fnmatch(rel := p.relative_to(root).as_posix(), ig)
                                 for ig in ignore)})
    if markers:
        raise CheckpointError(f"{root} looks unfinished (a write in progress or interrupted): "
                              f"found {', '.join(markers[:3])}")

    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    else:
        try:
            json.loads((root / "config.json").read_text())
        except (OSError, ValueError, RecursionError) as e:
            missing.append(f"a valid config.json ({' '.join(str(e).split())[:200]})")
    missing += _weights_problems(root, names)
    tok = [n for n in TOKENIZER_FILES if n in names]
    if "tokenizer_config.json" not in names or not tok:
        need = [] if "tokenizer_config.json" in names else ["tokenizer_config.json"]
        need += [] if tok else ["tokenizer.json (or tokenizer.model / vocab.json)"]
        missing.append(f"tokenizer files ({' and '.join(need)})")
    readme = next((f for f in files if f.path == "README.md"), None)
    if readme is None or readme.size == 0:
        missing.append("README.md (the model card)" if readme is None else "a non-empty README.md")
    if missing:
        raise CheckpointError(f"cannot push incomplete model directory {root}: missing "
                              + "; ".join(missing))
    return files
