"""Steps of a run with manifests, so a rerun skips what is finished and redoes what changed.

A step (derive_se, score_osm, merge, eval, ...) writes one output directory and, only after
it finished, a manifest ``<name>.json`` beside its siblings' in ``manifests/``::

    {"format": "safepatch-run-step", "step": ..., "key": sha256 of the inputs document,
     "inputs": {...}, "output": PATH, "output_id": fingerprint of the output's files,
     "seconds": ..., "finished": ISO time}

The key hashes the step's configuration together with the identities of its inputs: data files
by their sha256, external model directories by `dir_fingerprint`, and upstream steps by their
recorded `output_id`. A step is skipped when its manifest has the same key and its output
still has the recorded fingerprint; otherwise it runs again (after deleting the manifest, so a
run that dies midway never leaves a step marked done), and every step downstream of it sees a
new input identity and runs too.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..derive.record import now_iso
from ..io.atomic import write_atomic

MANIFEST_FORMAT = "safepatch-run-step"


def canonical_hash(doc) -> str:
    """sha256 of the canonical JSON form of `doc` (sorted keys, no whitespace)."""
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def dir_fingerprint(path: str | Path) -> str:
    """A cheap identity of a directory's content: sha256 over (relative path, size,
    mtime in ns) of every file below it, in path order. Any rewrite of a file changes it;
    no file bytes are read, so it costs the same for a 100 GB checkpoint as for a tiny one."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}\x00{st.st_size}\x00{st.st_mtime_ns}\n"
                     .encode())
    return h.hexdigest()


_SHA_CACHE: dict[tuple, str] = {}


def file_identity(path: str | Path) -> str:
    """sha256 of a (data) file's bytes, memoised on (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@dataclass
class StepOutcome:
    """What happened to one step in this invocation."""

    stage: str
    step: str
    status: str          # "ran" | "skipped"
    key: str
    output: str
    output_id: str
    seconds: float
    reason: str = ""     # why it ran: no manifest / inputs changed / output changed
    cpu_seconds: float = 0.0  # process CPU time (all threads): wall time on a shared machine
    #                           says little, this says what the step cost

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StepRunner:
    """Runs steps of one pipeline invocation and records their outcomes."""

    manifest_dir: Path
    force: bool = False
    log: Callable[[str], None] = print
    outcomes: list[StepOutcome] = field(default_factory=list)

    def manifest_path(self, stage: str, step: str) -> Path:
        return self.manifest_dir / stage / f"{step}.json"

    def read_manifest(self, stage: str, step: str) -> dict | None:
        p = self.manifest_path(stage, step)
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return m if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT else None

    def run(self, stage: str, step: str, inputs: dict, output: Path,
            fn: Callable[[Path], dict | None]) -> StepOutcome:
        """Run `fn(output)` unless a manifest says this exact step already produced `output`.

        inputs: JSON-able document of everything that decides the output (configs and input
        identities). fn must write `output` completely (or raise) and may return extra JSON
        to store in the manifest under "result". Returns the StepOutcome (output_id set)."""
        key = canonical_hash(inputs)
        old = self.read_manifest(stage, step)
        reason = "forced" if self.force else "no manifest"
        if old is not None and not self.force:
            if old.get("key") != key:
                reason = "inputs changed"
            elif not output.is_dir():
                reason = "output missing"
            elif dir_fingerprint(output) != old.get("output_id"):
                reason = "output changed since it was written"
            else:
                out = StepOutcome(stage, step, "skipped", key, str(output), old["output_id"], 0.0)
                self.outcomes.append(out)
                self.log(f"[{stage}] {step}: up to date, skipped")
                return out
        mpath = self.manifest_path(stage, step)
        mpath.unlink(missing_ok=True)
        self.log(f"[{stage}] {step}: running ({reason})")
        t0, c0 = time.perf_counter(), time.process_time()
        extra = fn(output)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        oid = dir_fingerprint(output)
        doc = {"format": MANIFEST_FORMAT, "stage": stage, "step": step, "key": key,
               "inputs": inputs, "output": str(output), "output_id": oid,
               "seconds": round(secs, 3), "cpu_seconds": round(cpu, 3), "finished": now_iso(), "result": extra}
        mpath.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(mpath, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
        out = StepOutcome(stage, step, "ran", key, str(output), oid, secs, reason, cpu)
        self.outcomes.append(out)
        self.log(f"[{stage}] {step}: done in {secs:.1f} s (CPU {cpu:.1f} s)")
        return out
