"""Timing one command: wall time and peak RSS of exactly that child, via ``os.wait4``.

``resource.getrusage(RUSAGE_CHILDREN)`` reports the maximum over every child ever
waited for, so it cannot tell two steps apart; ``wait4`` returns the rusage of the one
child it reaps (its ``ru_maxrss`` is the largest of that process and the descendants it
waited for, e.g. the builder's git subprocesses). Not for: deciding what to run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class BenchError(Exception):
    """A measured command failed: the benchmark cannot report a number for it."""


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    maxrss_kib: int
    timed_out: bool = False


@dataclass
class Series:
    """The timed runs of one command (warm-ups are not in it)."""

    samples: list[Sample] = field(default_factory=list)
    note: str = ""

    def add(self, s: Sample) -> None:
        self.samples.append(s)

    @property
    def median(self) -> float | None:
        return statistics.median(s.wall for s in self.samples) if self.samples else None

    @property
    def peak_rss_mib(self) -> float | None:
        return max(s.maxrss_kib for s in self.samples) / 1024 if self.samples else None

    @property
    def timed_out(self) -> bool:
        return any(s.timed_out for s in self.samples)

    @property
    def runs(self) -> int:
        return len(self.samples)


def run(argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, timeout: float | None = None,
        ok_codes: tuple[int, ...] = (0,)) -> Sample:
    """Run ``argv`` once; raise ``BenchError`` (with its stderr tail) if it fails."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                                stderr=err, env=dict(env) if env is not None else None,
                                cwd=cwd, start_new_session=True)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if fired.is_set():
            return Sample(wall, usage.ru_maxrss, timed_out=True)
        if proc.returncode not in ok_codes:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            cmd = " ".join(str(a) for a in argv)
            raise BenchError(f"`{cmd}` exited {proc.returncode}: " + " | ".join(tail))
    return Sample(wall, usage.ru_maxrss)


def sync() -> None:
    """Flush dirty pages so the next measured command does not pay for the last one."""
    os.sync()
