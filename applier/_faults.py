"""Fault injection for the crash tests: named points where a test may SIGKILL us.

Every durable step of a transaction (each write, rename, fsync, removal, journal
update) calls ``point(name)``. With ``GITOPS_FAULT_LOG`` set, each point appends its
name to that file, so a harness can enumerate the steps of an apply; with
``GITOPS_FAULT_AT=N`` the process kills itself with SIGKILL at the N-th point (1-based),
exactly as a power cut or ``kill -9`` would stop it. With neither set (production),
a point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counter = 0


def point(name: str) -> None:
    """Mark a crash point; kill the process here if the test asked for it."""
    log = os.environ.get("GITOPS_FAULT_LOG")
    at = os.environ.get("GITOPS_FAULT_AT")
    if log is None and at is None:
        return
    global _counter  # noqa: PLW0603 - one process-wide counter is the point of this module
    _counter += 1
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_counter} {name}\n")
    if at is not None and _counter == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
