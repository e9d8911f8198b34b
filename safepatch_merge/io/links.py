"""Which files a checkpoint directory may hand us: the one rule for links.

A path found in a directory (a shard, an index entry, a tokenizer file, a file to upload) is
*trusted* when it resolves — symbolic links followed — to a regular file inside that same
directory, or, when the directory lies in a huggingface_hub cache snapshot
(``.../models--org--name/snapshots/<revision>/...``), to a file in that same repository's
``blobs/`` (huggingface_hub stores every snapshot file as a link ``../../blobs/<hash>``).
Anything else — a link to ``/etc/passwd``, to another model, to a FIFO or a device — is
refused, naming the path. The checkpoint reader, the copy of backbone files into a merge's
output and ``safepatch push`` all apply this rule, so none of them reads, copies or uploads
what a link points to outside the directory.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import CheckpointError

# huggingface_hub names a cached repository "<type>s--<namespace>--<name>"
_HUB_REPO_DIR = re.compile(r"^(models|datasets|spaces)--.+")


class UntrustedLinkError(CheckpointError):
    """A path that resolves outside its directory (and outside its Hub cache's blobs/)."""


def _within(path: str, root: str) -> bool:
    """True if real path `path` is `root` or lies below it (both absolute and resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def hub_blobs_of(directory: str | Path) -> Path | None:
    """The real ``blobs/`` directory of the huggingface_hub cache repository whose snapshot
    holds `directory` (the directory itself or any folder below ``snapshots/<revision>/``),
    else None."""
    d = Path(os.path.realpath(directory))
    for anc in d.parents:
        if anc.name == "snapshots" and d != anc and anc.parent != anc:
            blobs = anc.parent / "blobs"
            # a blobs/ that is itself a link could make anything "a blob"
            if _HUB_REPO_DIR.match(anc.parent.name) and blobs.is_dir() \
                    and not blobs.is_symlink():
                return blobs
            return None
    return None


def resolves_inside(path: str | Path, root: str | Path) -> bool:
    """The containment half of the rule: `path`, links followed, is inside ``realpath(root)``
    or, for a `root` in a huggingface_hub snapshot, inside that repository's ``blobs/``."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(path)
    if _within(target, real_root) and target != real_root:
        return True
    blobs = hub_blobs_of(root)
    return blobs is not None and _within(target, str(blobs)) and target != str(blobs)


def trusted_target(path: str | Path, root: str | Path, *, what: str | None = None) -> Path:
    """The real path of `path` (a file in directory `root`) if the link rule trusts it and it
    is a regular file; else UntrustedLinkError (outside) or CheckpointError (missing, not a
    regular file), naming `what` (default: the path).

    Trusted: resolves inside ``realpath(root)``, or, for a `root` inside a huggingface_hub
    snapshot, inside that repository's ``blobs/``.
    """
    name = what or str(path)
    target = os.path.realpath(path)
    if not resolves_inside(path, root):
        where = f"{root}" + (" or its Hub cache's blobs/" if hub_blobs_of(root) else "")
        raise UntrustedLinkError(f"{name} resolves to {target}, outside {where}; refusing to "
                                 "follow it")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise CheckpointError(f"{name} does not exist" + (
            f" (a link to the missing {target})" if os.path.islink(path) else "")) from None
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{name} is not a regular file ({_kind(st.st_mode)})")
    return Path(target)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a plain file"


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file. Opened
    non-blocking, so a FIFO put in place of a file cannot block the open; the check is on the
    opened descriptor, so a file swapped after an earlier check is caught too. The caller
    closes it. Raises CheckpointError naming the path."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file ({_kind(mode)})")
    if hasattr(os, "O_NONBLOCK"):  # back to blocking reads (no effect on regular files)
        os.set_blocking(fd, True)
    return fd
