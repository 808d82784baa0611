"""Timing one command: wall time and peak RSS of exactly that child, via ``os.wait4``.

``resource.getrusage(RUSAGE_CHILDREN)`` reports the maximum over every child ever
waited for, so it cannot tell two steps apart; ``wait4`` returns the rusage of the one
child it reaps (its ``ru_maxrss`` is the largest of that process and the descendants it
waited for, e.g. the builder's git subprocesses). Not for: deciding what to run.

But Linux also carries into a child's ``ru_maxrss`` the high-water mark of the process
that forked it, from before its ``exec``: measured straight from this process (about
150 MiB once it has generated ``big``), every small command would show that. So each
command is started by a tiny launcher (``python -S``, a few MiB) that forks, execs the
command, and reports the command's own ``wait4`` figures and wall time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
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


_LAUNCHER = """\
import os, sys, time
fd = int(sys.argv[1])
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.close(fd)
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
os.write(fd, b"%11d\\n" % pid)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
os.write(fd, b"%d %.9f" % (usage.ru_maxrss, wall))
os._exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run(argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, timeout: float | None = None,
        ok_codes: tuple[int, ...] = (0,)) -> Sample:
    """Run ``argv`` once; raise ``BenchError`` (with its stderr tail) if it fails."""
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as err, os.fdopen(read_end, "rb") as report:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _LAUNCHER, str(write_end),
                 *(str(a) for a in argv)],
                stdout=subprocess.DEVNULL, stderr=err, pass_fds=(write_end,),
                env=dict(env) if env is not None else None, cwd=cwd,
                start_new_session=True)
        finally:
            os.close(write_end)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            # The command's pid comes first on the pipe. Processes that left the
            # launcher's group (Ansible's workers call setsid) would outlive the
            # benchmark: every descendant of the command is killed, then the group.
            command = int(os.read(read_end, 12) or b"0")
            for pid in _descendants(command) if command > 0 else []:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
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
        measured = report.read().split()[1:]  # after the command's pid
    if len(measured) != 2:
        raise BenchError(f"`{argv[0]}`: the launcher reported nothing")
    # The command's own figures: without the launcher's start-up, and with its peak RSS.
    return Sample(float(measured[1]), int(measured[0]))


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc (parents first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out = [pid]
    for p in out:
        out.extend(children.get(p, []))
    return out


def sync() -> None:
    """Flush dirty pages so the next measured command does not pay for the last one."""
    os.sync()
