"""Every call to the ``git`` executable, in one place.

For: reading ONE commit of the user's repository (resolve a revision, describe the
commit, list its tree, read or stream blobs, count commits) and writing a
``git bundle`` of that commit's history. Every call is an argv list run with
``git -C <repo>``, ``LC_ALL=C`` and no shell, so output is parseable and paths are
never interpreted.

Not for: anything about ``gitops.yaml``, templates or the bundle tar (``config.py``,
``render.py``, the writer). Nothing here writes to the user's repository: reads use
``GIT_OPTIONAL_LOCKS=0`` so even ``git status`` does not refresh the index, and the
history bundle is made in a throwaway repository that borrows the objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import subprocess
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from bundler.errors import GitError

logger = logging.getLogger(__name__)

_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# These would make `git -C repo` look somewhere else than the repo we were given
# (they are set, for instance, when the builder runs from inside a git hook).
_LOCATING_VARS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
)
MODE_FILE = "100644"
MODE_EXECUTABLE = "100755"
MODE_SYMLINK = "120000"
MODE_SUBMODULE = "160000"
DEFAULT_CHUNK = 1 << 20


# Keep git's memory flat on repos with large files: stream blobs above 16 MiB instead
# of inflating them whole (cat-file --batch held a 300 MB blob in memory: 590 MB RSS),
# and map pack files in small windows (the default window is 1 GiB). Measured on a
# 300 MB blob: 590 MB -> 68 MB peak RSS for `git cat-file --batch`.
MEMORY_BOUNDS = ("-c", "core.bigFileThreshold=16m", "-c", "core.packedGitWindowSize=16m",
                 "-c", "core.packedGitLimit=64m")


def _env(*, isolated: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LOCATING_VARS}
    env["LC_ALL"] = "C"
    env["GIT_OPTIONAL_LOCKS"] = "0"
    env["GIT_TERMINAL_PROMPT"] = "0"
    if isolated:
        # The history bundle must not depend on the user's ~/.gitconfig (pack.window,
        # core.compression...) or it would differ between two workstations.
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        env["GIT_CONFIG_GLOBAL"] = os.devnull
    return env


def _first_line(data: bytes) -> str:
    """git's reason: its first 'fatal:' or 'error:' line (a hint may follow it: for a
    repository owned by someone else the last line is the safe.directory command,
    and the cause, 'detected dubious ownership', comes first); else its last line."""
    lines = data.decode("utf-8", "replace").strip().splitlines()
    for line in lines:
        if line.startswith(("fatal: ", "error: ")):
            return line.split(": ", 1)[1]
    return lines[-1] if lines else "no message"


def _check_oid(oid: str) -> str:
    if not _OID.fullmatch(oid):
        raise GitError(f"git: {oid[:80]!r} is not an object id")
    return oid


def normalise_subpath(subpath: str) -> str:
    """A repo-relative directory ('' for the root) in canonical form, or GitError."""
    if subpath in ("", ".", "./"):
        return ""
    if "\\" in subpath or "\x00" in subpath:
        raise GitError(f"path {subpath!r} is not a POSIX path inside the repository")
    norm = posixpath.normpath(subpath)
    if norm.startswith(("/", "..")) or norm == ".":
        raise GitError(f"path {subpath!r} is not a directory inside the repository")
    return norm


@dataclass(frozen=True)
class CommitInfo:
    """What the manifest says about its source commit."""

    commit: str
    tree: str
    author: str  # "Name <email>"
    time: int  # committer time, unix seconds: the bundle's reproducible clock
    subject: str
    branch: str | None  # the local branch the revision named, if it named one


@dataclass(frozen=True)
class TreeEntry:
    """One entry of ``git ls-tree -r -l``; ``size`` is None for a submodule."""

    path: str
    mode: str
    type: str
    oid: str
    size: int | None

    @property
    def is_symlink(self) -> bool:
        return self.mode == MODE_SYMLINK

    @property
    def is_submodule(self) -> bool:
        return self.mode == MODE_SUBMODULE or self.type == "commit"

    @property
    def is_regular(self) -> bool:
        return self.type == "blob" and self.mode in (MODE_FILE, MODE_EXECUTABLE)

    @property
    def is_executable(self) -> bool:
        return self.mode == MODE_EXECUTABLE

    @property
    def kind(self) -> str:
        """A word for error messages: why this entry cannot be shipped as a file."""
        if self.is_symlink:
            return "a symlink"
        if self.is_submodule:
            return "a submodule"
        return "a regular file" if self.is_regular else f"a {self.type} (mode {self.mode})"


class GitRepo:
    """A local git repository, read through the ``git`` command line.

    Instances hold only the path and what it is (bare, where in the working tree), so
    they pickle cleanly into worker processes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        if not self.path.is_dir():
            raise GitError(f"{self.path}: no such directory")
        # Fails early and clearly instead of on the first real command.
        out = self._git("rev-parse", "--is-bare-repository", "--show-prefix",
                        what=f"{self.path}: cannot open as a git repository")
        lines = out.decode("utf-8", "replace").splitlines()
        # A bare clone (a mirror on the build machine) has objects and no working tree.
        self.bare = bool(lines) and lines[0] == "true"
        # Where ``path`` lies in the working tree ('' at its top): git runs from the top
        # (tree paths are relative to where it runs), and the builder reads ``prefix``
        # as the start of ``--path``.
        self.prefix = (lines[1] if len(lines) > 1 else "").rstrip("/")
        if self.prefix:
            self.path = self.toplevel

    def __repr__(self) -> str:
        return f"GitRepo({str(self.path)!r})"

    # -- plumbing ---------------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        return ["git", *MEMORY_BOUNDS, "-C", str(self.path), *args]

    def _git(self, *args: str, what: str | None = None) -> bytes:
        argv = self._argv(*args)
        logger.debug("running %s", argv)
        try:
            proc = subprocess.run(argv, capture_output=True, env=_env(), check=False)
        except FileNotFoundError as e:
            raise GitError("git is not installed (no 'git' on PATH)") from e
        if proc.returncode != 0:
            if what and not proc.stderr.strip():  # e.g. rev-parse --quiet: nothing to add
                raise GitError(what)
            reason = _first_line(proc.stderr)
            raise GitError(f"{what}: {reason}" if what else f"git {args[0]}: {reason}")
        return proc.stdout

    # -- revisions and commits --------------------------------------------------------

    @cached_property
    def toplevel(self) -> Path:
        """The root of the working tree (the repository itself when it is bare)."""
        if self.bare:
            return self.path
        out = self._git("rev-parse", "--show-toplevel",
                        what=f"{self.path}: has no working tree")
        return Path(out.decode("utf-8").rstrip("\n"))

    @property
    def name(self) -> str:
        """What a bundle records as ``source.repo``: the clone's directory name (a bare
        ``infra.git`` is ``infra``, like the working clone of it)."""
        name = self.toplevel.name
        return name.removesuffix(".git") if self.bare else name

    def resolve(self, rev: str) -> str:
        """The full commit id ``rev`` names; GitError if it names no commit."""
        if not rev or rev.startswith("-") or "\x00" in rev or "\n" in rev:
            raise GitError(f"{rev!r} is not a revision")
        out = self._git(
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}",
            what=f"{rev!r} is not a commit in {self.path}",
        )
        return out.decode("ascii").strip()

    def commit_info(self, rev: str) -> CommitInfo:
        """Describe the commit ``rev`` names (a branch, tag, ``HEAD`` or an id)."""
        commit = self.resolve(rev)
        out = self._git(
            "-c", "log.showSignature=false", "show", "--no-patch", "--encoding=UTF-8",
            "--format=%H%x00%T%x00%an <%ae>%x00%ct%x00%s", commit,
        )
        fields = out.decode("utf-8", "replace").rstrip("\n").split("\x00")
        if len(fields) != 5:
            raise GitError(f"git show {commit}: unexpected output")
        # rev never starts with "-" (resolve checked), and --end-of-options would be
        # echoed back by this rev-parse mode.
        full = self._git("rev-parse", "--symbolic-full-name", rev)
        ref = full.decode("utf-8", "replace").strip()
        branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
        return CommitInfo(commit=fields[0], tree=fields[1], author=fields[2],
                          time=int(fields[3]), subject=fields[4], branch=branch)

    def is_dirty(self) -> bool:
        """True if the working tree differs from HEAD (untracked files count); a bare
        repository has no working tree to differ."""
        if self.bare:
            return False
        out = self._git("status", "--porcelain", "-z", "--ignore-submodules=none",
                        what=f"{self.path}: cannot read the working tree status")
        return bool(out)

    def count_commits(self, commit: str) -> int:
        """How many commits lead to ``commit``: the default monotonic bundle sequence."""
        out = self._git("rev-list", "--count", "--end-of-options", self.resolve(commit))
        return int(out.decode("ascii").strip())

    # -- trees and blobs --------------------------------------------------------------

    def list_tree(self, commit: str, subpath: str = "") -> dict[str, TreeEntry]:
        """Every entry under ``subpath`` of the commit's tree, keyed by path relative to it.

        Symlinks and submodules are listed (``TreeEntry.kind`` says which); the caller
        rejects them only if the config references them, so an unrelated symlink in
        the repository does not break the build.
        """
        commit = self.resolve(commit)
        sub = normalise_subpath(subpath)
        treeish = f"{commit}:{sub}" if sub else f"{commit}^{{tree}}"
        kind = self._git("cat-file", "-t", treeish,
                         what=f"{sub!r} does not exist in commit {commit[:12]}")
        if kind.strip() != b"tree":
            raise GitError(f"{sub!r} is not a directory in commit {commit[:12]}")
        out = self._git("ls-tree", "-r", "-l", "-z", "--end-of-options", treeish)
        entries: dict[str, TreeEntry] = {}
        for record in out.split(b"\x00"):
            if not record:
                continue
            meta, _, raw_path = record.partition(b"\t")
            mode, typ, oid, size = meta.decode("ascii").split()
            try:
                path = raw_path.decode("utf-8")
            except UnicodeDecodeError:
                # gitops.yaml and templates name files in UTF-8 text: this one can never
                # be referenced, so it cannot stop the build (say so, in case it was meant).
                logger.warning("%r in commit %s: name is not UTF-8; no config or template "
                               "can refer to it, left out", raw_path, commit[:12])
                continue
            entries[path] = TreeEntry(path=path, mode=mode, type=typ, oid=oid,
                                      size=None if size == "-" else int(size))
        return entries

    def read_blob(self, oid: str) -> bytes:
        """A whole blob in memory: for templates and YAML, never for big static files."""
        return self._git("cat-file", "blob", _check_oid(oid),
                         what=f"cannot read blob {oid[:12]}")

    def stream_blob(self, oid: str, chunk: int = DEFAULT_CHUNK) -> Generator[bytes, None, None]:
        """A blob in chunks of at most ``chunk`` bytes from its own ``git cat-file``."""
        argv = self._argv("cat-file", "blob", _check_oid(oid))
        with tempfile.TemporaryFile() as err:
            # stderr goes to a file, not a pipe, so a chatty git cannot block on it
            # while we read stdout.
            try:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=_env())
            except FileNotFoundError as e:
                raise GitError("git is not installed (no 'git' on PATH)") from e
            stdout: IO[bytes] = proc.stdout  # type: ignore[assignment]  # set by PIPE
            finished = False
            try:
                while data := stdout.read(chunk):
                    yield data
                finished = True
            finally:
                if not finished:
                    proc.kill()
                stdout.close()
                rc = proc.wait()
            if rc != 0:
                err.seek(0)
                raise GitError(f"cannot read blob {oid[:12]}: {_first_line(err.read())}")

    def blob_reader(self) -> BlobReader:
        """One ``git cat-file --batch`` process for reading many blobs."""
        return BlobReader(self)

    # -- the history bundle -----------------------------------------------------------

    def create_bundle(self, commit: str, ref_name: str, out_path: str | os.PathLike[str],
                      ) -> dict[str, str]:
        """Write a ``git bundle`` of the commit's full history, with one ref pointing at it.

        Returns the bundle's tips (``{ref_name: commit}``). The user's repository is not
        modified: git cannot bundle a bare commit id, so the ref is created in a
        throwaway repository that borrows the objects through ``objects/info/alternates``.
        One pack thread and no user config make the bytes the same on every run over
        the same object store (a ``git gc`` in between may change delta choices).
        """
        with self.start_bundle(commit, ref_name, out_path) as pending:
            return pending.wait()

    def start_bundle(self, commit: str, ref_name: str, out_path: str | os.PathLike[str],
                     ) -> PendingBundle:
        """``create_bundle`` with the packing left running: ``git bundle create`` works
        while the caller goes on, and ``PendingBundle.wait`` gives the tips. Everything
        that can be refused (the ref name, a shallow clone) is checked here, first."""
        commit = self.resolve(commit)
        if not ref_name.startswith("refs/"):
            raise GitError(f"ref name {ref_name!r} must start with 'refs/'")
        self._git("check-ref-format", ref_name, what=f"{ref_name!r} is not a valid ref name")
        shallow = self._git("rev-parse", "--is-shallow-repository").strip()
        if shallow == b"true":
            raise GitError(f"{self.path} is a shallow clone: the history bundle needs the "
                           "full history (run 'git fetch --unshallow')")
        objects = self._git("rev-parse", "--path-format=absolute", "--git-path", "objects")
        return PendingBundle(objects, commit, ref_name, Path(out_path).absolute())


class PendingBundle:
    """A history bundle that ``git bundle create`` is writing (a context manager: leaving
    it stops git if it still runs and removes the scratch repository)."""

    def __init__(self, objects: bytes, commit: str, ref_name: str, out: Path) -> None:
        self._out = out
        self._tips = {ref_name: commit}
        self._tmp = tempfile.TemporaryDirectory(prefix="gitops-bundle-")
        # Closed in close(): a with-block cannot span the git process.
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            scratch = Path(self._tmp.name) / "scratch.git"
            _run_isolated("init", "--quiet", "--bare", "--template=", str(scratch))
            (scratch / "objects" / "info").mkdir(parents=True, exist_ok=True)
            (scratch / "objects" / "info" / "alternates").write_bytes(objects)
            _run_isolated("-C", str(scratch), "update-ref", ref_name, commit)
            argv = _isolated_argv("-C", str(scratch), "-c", "pack.threads=1",
                                  "bundle", "create", "--quiet", str(out), ref_name)
            logger.debug("starting %s", argv)
            # No pipes: a worker forked meanwhile (render.py) inherits nothing git waits on.
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=self._err,
                                          env=_env(isolated=True))
        except BaseException:
            self._err.close()
            self._tmp.cleanup()
            raise

    def wait(self) -> dict[str, str]:
        """The bundle's tips, once git has written it; GitError if git failed."""
        if self._proc.wait() != 0:
            self._err.seek(0)
            raise _bundle_error(self._err.read())
        logger.debug("wrote history bundle %s (%s)", self._out, self._tips)
        return self._tips

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._err.close()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _isolated_argv(*args: str) -> list[str]:
    """A git command for the history bundle's scratch repository (run with
    ``_env(isolated=True)``)."""
    return ["git", *MEMORY_BOUNDS, *args]


def _bundle_error(stderr: bytes) -> GitError:
    return GitError(f"creating the history bundle: {_first_line(stderr)}")


def _run_isolated(*args: str) -> None:
    argv = _isolated_argv(*args)
    logger.debug("running %s", argv)
    proc = subprocess.run(argv, capture_output=True, env=_env(isolated=True), check=False)
    if proc.returncode != 0:
        raise _bundle_error(proc.stderr)


class BlobReader:
    """Many blobs through one ``git cat-file --batch`` process (a context manager).

    One request is in flight at a time: a ``stream`` must be consumed (or closed,
    which drains it) before the next request, because the batch protocol is a
    single ordered byte stream.
    """

    def __init__(self, repo: GitRepo) -> None:
        self._repo = repo
        # Lives as long as the reader, closed in close(): a with-block cannot span it.
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                repo._argv("cat-file", "--batch"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=_env(),
            )
        except FileNotFoundError as e:
            self._err.close()
            raise GitError("git is not installed (no 'git' on PATH)") from e
        # Popen with PIPE always sets both; keeping typed references saves re-checks.
        self._stdin: IO[bytes] = self._proc.stdin  # type: ignore[assignment]
        self._stdout: IO[bytes] = self._proc.stdout  # type: ignore[assignment]
        self._busy = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        proc = self._proc
        with contextlib.suppress(BrokenPipeError):  # git already exited
            self._stdin.close()
        self._stdout.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._err.close()

    def _request(self, oid: str) -> int:
        if self._busy:
            raise GitError("BlobReader: the previous stream was not finished")
        stdin, stdout = self._stdin, self._stdout
        try:
            stdin.write(_check_oid(oid).encode("ascii") + b"\n")
            stdin.flush()
        except BrokenPipeError as e:
            raise GitError(f"git cat-file --batch exited: {self._stderr()}") from e
        header = stdout.readline()
        if not header.endswith(b"\n"):
            raise GitError(f"git cat-file --batch exited: {self._stderr()}")
        parts = header.decode("ascii", "replace").split()
        if len(parts) == 2 and parts[1] == "missing":
            raise GitError(f"object {oid[:12]} is missing from {self._repo.path}")
        if len(parts) != 3 or parts[0] != oid:
            raise GitError(f"git cat-file --batch: unexpected header {header[:100]!r}")
        if parts[1] != "blob":
            raise GitError(f"object {oid[:12]} is a {parts[1]}, not a blob")
        return int(parts[2])

    def _stderr(self) -> str:
        self._err.seek(0)
        return _first_line(self._err.read())

    def _read_exact(self, n: int) -> bytes:
        data = self._stdout.read(n)
        if len(data) != n:
            raise GitError(f"git cat-file --batch: short read ({len(data)} of {n} bytes)")
        return data

    def read(self, oid: str) -> bytes:
        """A whole (small) blob."""
        size = self._request(oid)
        data = self._read_exact(size)
        self._read_exact(1)  # the LF that ends every batch record
        return data

    def stream(self, oid: str, chunk: int = DEFAULT_CHUNK) -> Generator[bytes, None, None]:
        """A blob in chunks of at most ``chunk`` bytes, never whole in memory."""
        size = self._request(oid)
        self._busy = True
        left = size
        try:
            while left:
                data = self._read_exact(min(chunk, left))
                left -= len(data)
                yield data
        finally:
            # Closed early: drain the rest so the next request reads its own header.
            while left:
                left -= len(self._read_exact(min(chunk, left)))
            self._read_exact(1)
            self._busy = False

    def hash(self, oid: str, chunk: int = DEFAULT_CHUNK) -> tuple[str, int]:
        """(SHA-256 hex, size) of a blob, streamed."""
        h = hashlib.sha256()
        size = 0
        for data in self.stream(oid, chunk):
            h.update(data)
            size += len(data)
        return h.hexdigest(), size
