"""Where a merge's wall time goes: seconds per named stage, for the log, ``--stats`` and bench/.

Stages are timed on the thread that runs them. The main thread's stages (``open``,
``prepass``, ``stream`` ...) add up to the merge's wall time; names with a dot are parts of
a stage (``stream.read_wait``: the main thread waiting for the reader), and the background
threads' busy time (``reader_busy``, ``writer_busy``) overlaps the rest.
"""
from __future__ import annotations

import time
from contextlib import contextmanager


class StageClock:
    """Accumulates wall seconds per stage name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def as_dict(self) -> dict[str, float]:
        """{stage: seconds, rounded to 1 ms}, in the order the stages first ran."""
        return {k: round(v, 3) for k, v in self.seconds.items()}

    def line(self) -> str:
        """One line for a log or terminal (see :meth:`line_of`)."""
        return self.line_of(self.seconds)

    @staticmethod
    def line_of(seconds: dict[str, float]) -> str:
        """``open 0.12 s, prepass 0.80 s (read_wait 0.50, compute 0.20)`` from {stage: s}."""
        parts = []
        for k, v in seconds.items():
            if "." in k:
                continue
            sub = [f"{s.split('.', 1)[1]} {w:.2f}" for s, w in seconds.items()
                   if s.startswith(k + ".")]
            parts.append(f"{k} {v:.2f} s" + (f" ({', '.join(sub)})" if sub else ""))
        return ", ".join(parts)
