"""A real git repository holding the example fleet, for tests of the build side.

Shared by tests/bundler/test_git.py and test_render.py: deterministic identity and
dates, and no hooks or signing from the machine's git config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fleet"
DATE = "2025-01-02T03:04:05+00:00"
DATE_UNIX = 1735787045
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Fleet Admin",
    "GIT_AUTHOR_EMAIL": "admin@example.org",
    "GIT_COMMITTER_NAME": "Fleet Admin",
    "GIT_COMMITTER_EMAIL": "admin@example.org",
    "GIT_AUTHOR_DATE": DATE,
    "GIT_COMMITTER_DATE": DATE,
    # No commit.gpgsign, hooks or aliases from the machine's config.
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def run_git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], env={**os.environ, **GIT_ENV},
                          capture_output=True, text=True, check=check)


@dataclass(frozen=True)
class FleetRepo:
    """A git repository holding a copy of the example fleet (optionally in a subdir)."""

    path: Path
    subdir: str = ""

    @classmethod
    def create(cls, path: Path, subdir: str = "", source: Path | None = EXAMPLE,
               ) -> FleetRepo:
        path.mkdir(parents=True)
        run_git(path, "init", "--quiet", "--initial-branch=main")
        repo = cls(path, subdir)
        if source is not None:
            shutil.copytree(source, repo.root, dirs_exist_ok=True)
            repo.commit("Import the example fleet")
        return repo

    @property
    def root(self) -> Path:
        """The directory that holds gitops.yaml."""
        return self.path / self.subdir if self.subdir else self.path

    def git(self, *args: str) -> str:
        return run_git(self.path, *args).stdout

    def write(self, rel: str, data: str | bytes) -> Path:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)
        return target

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def replace(self, rel: str, old: str, new: str) -> None:
        """Edit a file in place; fails loudly if ``old`` is not there (a stale test)."""
        text = self.read(rel)
        assert old in text, f"{old!r} not in {rel}"
        self.write(rel, text.replace(old, new, 1))

    def commit(self, message: str = "Change") -> str:
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD").strip()
