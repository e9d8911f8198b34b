"""Is a model directory complete enough to publish? (weights, config, tokenizer, model card)

`check_model_dir` refuses, with one line naming everything missing, a directory that a user
should not push: no config.json, no model card (README.md), no tokenizer files, safetensors
shards that do not match `model.safetensors.index.json` (missing, unlisted, truncated, or
holding other tensors than the index says), or signs of an unfinished write (`*.partial`,
`*.inprogress`, the merge writer's manifest or work directory).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Left behind by an unfinished or interrupted write (safepatch_merge.io.writer and others).
PARTIAL_MARKERS = (".safepatch_manifest.json", ".safepatch_work", "*.partial", "*.partial-*",
                   "*.inprogress", "*.incomplete", "*.tmp")
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


def list_upload_files(out_dir: str | Path) -> list[UploadFile]:
    """Every regular file under `out_dir` that upload_folder would send, sorted by path."""
    root = Path(out_dir)
    ignore = _ignore_patterns()
    files = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if any(fnmatch(rel, pat) for pat in ignore):
            continue
        files.append(UploadFile(rel, p.stat().st_size))
    return files


def _safetensors_problem(path: Path, expected: set[str] | None) -> str | None:
    """None if `path` has a well-formed safetensors header whose data fits the file exactly
    (and, if `expected` is given, holds exactly those tensors); else what is wrong."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                return f"{path.name} has a bad header length ({n} bytes in a {size}-byte file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} has an unreadable header ({e})"
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if size != 8 + n + end:
        return f"{path.name} is truncated or padded ({size} bytes, header says {8 + n + end})"
    if expected is not None and set(header) != expected:
        diff = sorted(set(header) ^ expected)
        return (f"{path.name} holds other tensors than {INDEX} lists "
                f"({len(diff)} differ, e.g. {diff[0]})")
    return None


def _weights_problems(root: Path, names: set[str]) -> list[str]:
    problems = []
    on_disk = {n for n in names if n.endswith(".safetensors") and "/" not in n}
    if INDEX in names:
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"a readable {INDEX} ({type(e).__name__}: {e})"]
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            pp = PurePosixPath(shard)
            if pp.is_absolute() or ".." in pp.parts or shard.startswith("\\"):
                return [f"{INDEX} names a shard outside the directory: {shard}"]
            shards.setdefault(shard, set()).add(tensor)
        missing = sorted(s for s in shards if s not in names)
        if missing:
            problems.append(f"shard {', '.join(missing)} (listed in {INDEX})")
        unlisted = sorted(on_disk - set(shards))
        if unlisted:
            problems.append(f"an index entry for {', '.join(unlisted)} (not in {INDEX})")
        for shard in sorted(set(shards) - set(missing)):
            bad = _safetensors_problem(root / shard, shards[shard])
            if bad:
                problems.append(f"an intact shard: {bad}")
    elif SINGLE in names:
        bad = _safetensors_problem(root / SINGLE, None)
        if bad:
            problems.append(f"an intact {SINGLE}: {bad}")
        extra = sorted(on_disk - {SINGLE})
        if extra:
            problems.append(f"an index for the extra shards {', '.join(extra)}")
    else:
        problems.append(f"weights ({SINGLE} or {INDEX} with its shards)")
    return problems


def check_model_dir(out_dir: str | Path) -> list[UploadFile]:
    """The files to upload from the model directory `out_dir`, after checking it is complete.

    Required: config.json (valid JSON), safetensors weights (one model.safetensors, or the
    shards of model.safetensors.index.json, each with an intact header holding exactly the
    tensors the index assigns it), tokenizer_config.json plus a tokenizer file
    (tokenizer.json, tokenizer.model, vocab.json or tiktoken.model), and a non-empty README.md
    (the model card). Raises CheckpointError naming everything missing on one line.
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise CheckpointError(f"model directory not found: {root}")
    if any(fnmatch(root.name, pat) for pat in ("*.partial", "*.partial-*")):
        raise CheckpointError(f"{root} is an unfinished output (a .partial directory); push the "
                              "finished directory instead")
    files = list_upload_files(root)
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
        except (OSError, ValueError) as e:
            missing.append(f"a valid config.json ({e})")
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
