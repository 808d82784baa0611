"""Logging for both command-line tools: one line per event on stderr.

Under systemd (``JOURNAL_STREAM`` is set), each line starts with the syslog priority
prefix (``<3>`` for errors...) that journald understands, so ``journalctl -u
gitops-apply -p warning`` filters correctly. Not for: program output (stdout, --json).
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _Formatter(logging.Formatter):
    def __init__(self, prog: str, journald: bool) -> None:
        super().__init__()
        self.prog = prog
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", " ")
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{message}"
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{self.prog}: {level}{message}"


def under_systemd() -> bool:
    return "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the one at set-up:
    a caller that swaps it (a test runner, click's CliRunner) and closes its stream must
    not leave later records writing to a closed file."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        del value  # always sys.stderr


def setup(prog: str, verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(prog, under_systemd()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def printable(text: str) -> str:
    """``text`` safe to write as UTF-8: a file name that is not UTF-8 (bytes Python
    keeps as lone surrogates) comes out with backslash escapes, never raised on."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_line(prog: str, message: str) -> str:
    """The one line a failed command prints."""
    text = " ".join(message.split())
    if under_systemd():
        return f"<3>{text}"
    return f"{prog}: error: {text}"
