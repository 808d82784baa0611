"""Shared fixtures: real tools (git, ssh-keygen, nginx), keys, a stand-in systemctl.

A test that needs a tool calls ``require_tool``: locally a missing tool skips the
test; in CI (``CI=true``) it fails it, because ./scripts/test installs every tool.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from applier.apply import init_host

from factory import KeyPair, make_key, write_allowed_signers

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLEET = REPO_ROOT / "examples" / "fleet"

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Ada Ops", "GIT_AUTHOR_EMAIL": "ada@example.org",
    "GIT_COMMITTER_NAME": "Ada Ops", "GIT_COMMITTER_EMAIL": "ada@example.org",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}


def _unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; in CI fail instead (it installs what the tests
    need and runs them as root, so every test must run there)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI installs the tools and runs as root, so must cover this")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The tool's path; skip the test if it is missing (fail instead in CI)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        _unavailable(f"{name} not installed")
    return path


def git(repo: Path, *args: str, date: str = "2026-11-01T12:00:00Z") -> str:
    env = {**os.environ, **GIT_ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def commit_all(repo: Path, message: str, date: str = "2026-11-01T12:00:00Z") -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message, date=date)
    return git(repo, "rev-parse", "HEAD")


def free_bytes(path: Path) -> int:
    """What an unprivileged writer may still put on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards whatever happens: a full disk, for real."""
    if os.geteuid() != 0:
        _unavailable("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs",
                           str(mnt)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        _unavailable(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def fleet_repo(tmp_path: Path) -> Path:
    """A real git repo holding examples/fleet, one commit on branch main."""
    require_tool("git")
    repo = tmp_path / "infra"
    shutil.copytree(EXAMPLE_FLEET, repo)
    git(repo, "init", "-q", "-b", "main")
    commit_all(repo, "Initial fleet")
    return repo


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    require_tool("ssh-keygen")
    return make_key(tmp_path_factory.mktemp("keys"), "ops")


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    require_tool("ssh-keygen")
    return make_key(tmp_path_factory.mktemp("keys"), "mallory")


@pytest.fixture
def root(tmp_path: Path, signing_key: KeyPair) -> Path:
    """A host "frodo" under a fresh root, initialised to trust ``signing_key``."""
    root = tmp_path / "frodo"
    init_host(root, "frodo", write_allowed_signers(tmp_path / "allowed_signers", signing_key))
    return root


class Systemctl:
    """A stand-in ``systemctl`` on PATH that records its calls (systemd is not PID 1 here)."""

    def __init__(self, bindir: Path, log: Path) -> None:
        self.bindir = bindir
        self.log = log

    def calls(self) -> list[str]:
        if not self.log.exists():
            return []
        return self.log.read_text().splitlines()

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Systemctl:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "systemctl.log"
    script = bindir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "systemctl $*" >> "{log}"\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}:/usr/sbin:/sbin")
    return Systemctl(bindir, log)


def systemd_analyze_verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify --root=ROOT UNIT...`` with the distribution's units copied in.

    Under --root, systemd resolves every dependency (sysinit.target...) and every
    ExecStart binary inside the root, so the root needs the system's unit files; the
    binaries the units name are the ones the applied bundle put there.
    """
    analyze = require_tool("systemd-analyze")
    system_units = Path("/usr/lib/systemd/system")
    target = root / "usr/lib/systemd/system"
    if system_units.is_dir() and not target.exists():
        shutil.copytree(system_units, target, symlinks=True)
    return subprocess.run([analyze, "verify", f"--root={root}", *units], capture_output=True,
                          text=True, check=False,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
