"""Running the commands a manifest names: validate, check, on_change, health.

A command is split with ``shlex`` and run without a shell, with a timeout, its
output captured (bounded) for the audit log. ``{path}`` is replaced by the staged
file (validate) and ``{root}`` by the host root ("" for ``/``), per argument, after
splitting, so a placeholder can never inject extra arguments. A non-zero exit or a
timeout is a failure, never ignored; a command that times out is killed with its
whole process group. Not for: deciding *which* commands run (plan.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from applier.manifest import Command

if TYPE_CHECKING:
    import subprocess

logger = logging.getLogger(__name__)
MAX_OUTPUT = 16 << 10
KILL_GRACE = 5  # seconds to collect output after killing a timed-out command


@dataclass(frozen=True)
class CommandResult:
    """How one check, on_change or health command ended, and its output (capped)."""

    run: str
    returncode: int | None  # None: did not start or timed out
    output: str
    seconds: float
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def reason(self) -> str:
        if self.returncode is None:
            return self.output.splitlines()[-1] if self.output else "did not run"
        last = self.output.strip().splitlines()[-1:] or [""]
        detail = f": {last[0][:200]}" if last[0] else ""
        return f"exited {self.returncode}{detail}"

    def to_dict(self) -> dict[str, object]:
        return {"run": self.run, "returncode": self.returncode, "output": self.output,
                "seconds": round(self.seconds, 3), "attempts": self.attempts}


def expand(cmd: Command, values: Mapping[str, str]) -> list[str]:
    argv = shlex.split(cmd.run)
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)  # noqa: PLW2901 - rewriting each arg
        out.append(arg)
    return out


def run(cmd: Command, values: Mapping[str, str], env: Mapping[str, str] | None = None,
        retry: bool = False) -> CommandResult:
    """Run one command; with ``retry``, honour its retries/delay (health checks)."""
    attempts = 1 + (cmd.retries if retry else 0)
    result = _run_once(cmd, values, env)
    n = 1
    while not result.ok and n < attempts:
        time.sleep(cmd.delay)
        n += 1
        result = _run_once(cmd, values, env)
    return CommandResult(result.run, result.returncode, result.output, result.seconds, n)


def _run_once(cmd: Command, values: Mapping[str, str],
              env: Mapping[str, str] | None) -> CommandResult:
    # Imported on first use: most runs (status, a no-op apply) start no command, and
    # subprocess is a noticeable part of the CLI's start-up.
    import subprocess  # noqa: PLC0415

    start = time.monotonic()
    try:
        argv = expand(cmd, values)
    except ValueError as e:
        return CommandResult(cmd.run, None, f"cannot parse command: {e}", 0.0)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        # Its own session: on timeout the whole group goes, not just the first process
        # (``sh -c "sleep 99"`` would otherwise leave the sleep running, pipe open).
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    except OSError as e:
        return CommandResult(cmd.run, None, f"cannot run {argv[0]!r}: {e.strerror}",
                             time.monotonic() - start)
    tail = bytearray()
    try:
        if not _collect(proc, tail, start + cmd.timeout):
            _kill_group(proc)
            # A child that left the group may hold the pipe: give up on it after a grace.
            _collect(proc, tail, time.monotonic() + KILL_GRACE)
            out = _text(bytes(tail)) + f"\ntimed out after {cmd.timeout}s (killed)"
            logger.warning("%s: timed out after %ss, killed", cmd.run, cmd.timeout)
            proc.wait()
            return CommandResult(cmd.run, None, out.strip(), time.monotonic() - start)
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    stdout = bytes(tail)
    result = CommandResult(cmd.run, proc.returncode, _text(stdout),
                           time.monotonic() - start)
    logger.debug("ran %s -> %s", cmd.run, proc.returncode)
    return result


def _collect(proc: subprocess.Popen[bytes], tail: bytearray, deadline: float) -> bool:
    """Read the command's output into ``tail``, keeping only its last ``MAX_OUTPUT``
    bytes (a chatty ``nginx -T`` or a looping health check must not grow the applier
    towards the OOM killer mid-transaction), until it exits; False at ``deadline``."""
    import selectors  # noqa: PLC0415 - with subprocess, see _run_once
    import subprocess  # noqa: PLC0415

    if proc.stdout is None:
        raise RuntimeError("internal: a command started without an output pipe")
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not sel.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            tail += chunk
            if len(tail) > 2 * MAX_OUTPUT:
                del tail[:-MAX_OUTPUT]
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # closed its output, still running
        return False
    return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data[-MAX_OUTPUT:]
    return data[-MAX_OUTPUT:].decode("utf-8", "replace")


def unique(commands: Iterable[Command]) -> list[Command]:
    """Each distinct command once, in order of first appearance."""
    seen: dict[Command, None] = {}
    for c in commands:
        seen.setdefault(c, None)
    return list(seen)
