"""Shared checks for the hostile-input tests: run a command in-process under a time limit,
and prove that a refusal left nothing at OUT and changed no file outside it."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
from pathlib import Path

from safepatch_merge.cli import main


class Hang(Exception):
    """A command ran past its time limit (a hang, not an error)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Hang in the main thread if the block runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """{path: (kind, size, mtime_ns, sha256 or link target)} of everything under `root`
    except the `skip` paths and what lies below them; links are recorded, not followed."""
    root = Path(root)
    skip_s = tuple(str(Path(s)) for s in skip)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            sp = str(p)
            if any(sp == s or sp.startswith(s + os.sep) for s in skip_s):
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[sp] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[sp] = ("file", st.st_size, st.st_mtime_ns,
                           hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                out[sp] = ("dir",)
            else:
                out[sp] = ("other", stat.S_IFMT(st.st_mode))
    return out


def run_cli(capsys, argv: list[str], seconds: float = 120.0) -> tuple[int, str, str]:
    """(exit status, the last `safepatch CMD: error:` line, all of stderr) of `safepatch
    argv...` run in-process under a time limit."""
    capsys.readouterr()
    with time_limit(seconds):
        rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    cmd = str(argv[0])
    lines = [ln for ln in err.splitlines() if ln.startswith(f"safepatch {cmd}: error:")]
    return rc, (lines[-1] if lines else ""), err


def expect_refusal(capsys, argv, needles, *, watch: Path, out: Path | None = None,
                   seconds: float = 120.0) -> str:
    """Run `safepatch argv...` and assert: exit status 1; exactly one error line, on one line,
    containing every needle; nothing at `out` or `out`.partial; no file under `watch`
    (outside `out`) created, changed or removed. Returns the error line."""
    skip = () if out is None else (Path(out), Path(str(out) + ".partial"))
    before = snapshot(watch, skip)
    rc, line, err = run_cli(capsys, argv, seconds)
    assert rc == 1, err[-3000:]
    assert line, err[-3000:]
    assert sum(ln.startswith(f"safepatch {argv[0]}: error:") for ln in err.splitlines()) == 1
    for n in needles:
        assert str(n) in line, (n, line)
    assert len(line) < 2500, len(line)
    if out is not None:
        assert not os.path.lexists(out), f"{out} exists"
        assert not os.path.lexists(str(out) + ".partial"), f"{out}.partial exists"
    after = snapshot(watch, skip)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, changed[:5]
    return line
