"""Build (JIT, once per machine) and load the csrc extension: the C++ (and CUDA C++) kernels of
the ``safepatch::`` ops, whose schemas and fake implementations :mod:`.library` defines.

Sources: ``safepatch_merge.csrc`` (the repository's csrc/ folder, editable or installed):
``*.cpp`` and ``cpu/*.cpp`` always, ``cuda/*.cu`` only when torch sees a CUDA device and a
CUDA toolkit is found. The build lives in ``~/.cache/safepatch_merge/<name>/`` (or
``$SAFEPATCH_CACHE``), where the name carries the torch version, a hash of every source file,
the flags and the CPU model, so a stale or foreign build is never loaded. ``SAFEPATCH_NO_EXT=1``
disables the extension; a failed build logs one warning and the package falls back to the
plain-torch reference.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import platform
import re
import shutil
import threading
from pathlib import Path

import torch

from . import library  # noqa: F401 - the schemas the extension's kernels register against

log = logging.getLogger("safepatch_merge.ops")

_lock = threading.Lock()
_state: dict = {}  # "loaded": bool | None (None = not tried), "error": str, "cuda": bool


def disabled() -> bool:
    """True when SAFEPATCH_NO_EXT=1 (or true/yes) is set."""
    return os.environ.get("SAFEPATCH_NO_EXT", "").strip().lower() in ("1", "true", "yes")


def csrc_dir() -> Path:
    """The csrc folder of the installed (or editable) package."""
    return Path(str(importlib.resources.files("safepatch_merge.csrc")))


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _sources(root: Path, with_cuda: bool) -> list[Path]:
    src = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        src += sorted((root / "cuda").glob("*.cu"))
    return src


def _cpu_id() -> str:
    # -march=native code must never run on another CPU model sharing this cache directory.
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        return (model.group(1) if model else "") + "|" + (flags.group(1) if flags else "")
    except OSError:
        return platform.processor() or platform.machine()


def _flags() -> tuple[list[str], list[str], list[str]]:
    """(C++ flags, CUDA flags, linker flags)."""
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") and \
            os.environ.get("SAFEPATCH_PORTABLE_BUILD", "") != "1":
        cflags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
    # fmad=false: the CUDA kernels round like the CPU and the reference (no FMA contraction).
    cuflags = ["-O3", "--fmad=false"]
    return cflags, cuflags, ["-fopenmp"]


def _build_name(sources: list[Path], root: Path, flags) -> str:
    h = hashlib.sha256()
    headers = sorted(p for p in root.rglob("*") if p.suffix in (".h", ".cuh"))
    for p in sorted(set(sources) | set(headers)):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    h.update(repr(flags).encode())
    h.update(_cpu_id().encode())
    tv = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"safepatch_ops_torch{tv}_{h.hexdigest()[:16]}"


def cache_root() -> Path:
    env = os.environ.get("SAFEPATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "safepatch_merge"


def load() -> bool:
    """Build if needed and load the extension; True when the ``safepatch::`` ops have CPU kernels.

    Never raises: a failure is logged once (warning) and remembered for the process.
    """
    if disabled():
        return False
    with _lock:
        if "loaded" in _state:
            return _state["loaded"]
        try:
            _state["cuda"] = _build_and_load()
            _state["loaded"] = True
        except Exception as e:  # noqa: BLE001 - any build/load failure means "use the reference"
            _state["loaded"] = False
            _state["error"] = f"{type(e).__name__}: {e}"
            first = str(e).strip().splitlines()[-1:] or [""]
            log.warning("safepatch_merge: the C++ extension is unavailable (%s: %s); "
                        "falling back to the plain-torch reference ops", type(e).__name__, first[0])
        return _state["loaded"]


def has_cuda() -> bool:
    """True when the loaded extension was built with its CUDA sources."""
    return bool(load() and _state.get("cuda"))


def library_path() -> str | None:
    """The loaded extension's shared library, if any."""
    return _state.get("path")


def error() -> str | None:
    """The build/load error of this process, if any."""
    return _state.get("error")


def _build_and_load() -> bool:
    from torch.utils import cpp_extension

    root = csrc_dir()
    with_cuda = bool(torch.cuda.is_available() and _cuda_home()
                     and list((root / "cuda").glob("*.cu")))
    sources = _sources(root, with_cuda)
    if not sources:
        raise FileNotFoundError(f"no C++ sources under {root}")
    cflags, cuflags, ldflags = _flags()
    name = _build_name(sources, root, (cflags, cuflags, ldflags, with_cuda))
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / f"{name}.so"
    loaded = False
    if so.is_file() and not (build_dir / "lock").exists():
        # Same name = same sources, flags, torch and CPU: load without re-running ninja.
        try:
            torch.ops.load_library(str(so))
            loaded = True
        except OSError:  # e.g. a link cut short by a crash: build again from scratch
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True, exist_ok=True)
    if not loaded:
        # Keep the first build short on small CI machines: ninja runs one job per core
        # (set only for this build, unless the user chose MAX_JOBS).
        had_jobs = "MAX_JOBS" in os.environ
        os.environ.setdefault("MAX_JOBS", str(max(1, min(8, os.cpu_count() or 1))))
        try:
            cpp_extension.load(
                name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                extra_cuda_cflags=cuflags, extra_ldflags=ldflags, extra_include_paths=[str(root)],
                build_directory=str(build_dir), is_python_module=False, with_cuda=with_cuda,
                verbose=os.environ.get("SAFEPATCH_VERBOSE_BUILD", "") == "1")
        finally:
            if not had_jobs:
                os.environ.pop("MAX_JOBS", None)
    _state["path"] = str(so)
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"safepatch::{op}", "CPU")
               for op in library.OPS + library.CLASSIC_OPS):
        raise RuntimeError(f"{so} loaded but registered no CPU kernels for the safepatch ops")
    return with_cuda and torch._C._dispatch_has_kernel_for_dispatch_key(
        "safepatch::masked_merge", "CUDA")
