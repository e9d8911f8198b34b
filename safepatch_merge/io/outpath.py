"""An output directory must stay apart from the inputs it is made from.

``--overwrite`` deletes what is at OUT and a merge builds in ``OUT.partial``; if OUT were an
input, inside one, or held one (``.`` as OUT, a score directory inside the backbone, the
backbone under OUT), finishing the merge would destroy that input. Paths are compared after
resolving links, so a link cannot hide the overlap.
"""
from __future__ import annotations

import os
from pathlib import Path

from .writer import OutputError


def _real(p: str | Path) -> str:
    return os.path.realpath(os.path.abspath(p))


def _below(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_apart(out: str | Path, dirs: dict[str, str | Path],
                files: dict[str, str | Path] | None = None) -> None:
    """Raise OutputError naming both paths if OUT or OUT.partial is, lies inside, or
    contains an input directory of `dirs` ({label: path}), or contains an input file of
    `files` (e.g. the config) or the current working directory."""
    out = Path(out)
    targets = [out, out.with_name(out.name + ".partial")]
    for label, d in dirs.items():
        real_in = _real(d)
        for t in targets:
            real_t = _real(t)
            how = ("is" if real_t == real_in else "lies inside" if _below(real_t, real_in)
                   else "contains" if _below(real_in, real_t) else None)
            if how:
                raise OutputError(f"output {t} {how} the {label} {d}; the output must be a "
                                  "directory apart from every input")
    others = dict(files or {})
    others["current directory"] = os.getcwd()
    for label, f in others.items():
        real_in = _real(f)
        for t in targets:
            real_t = _real(t)
            if real_t == real_in or _below(real_in, real_t):
                raise OutputError(f"output {t} {'is' if real_t == real_in else 'contains'} the "
                                  f"{label} {f}; the output must be a directory apart from "
                                  "every input")
