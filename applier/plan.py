"""What an apply would change: compare a host's manifest entry with the disk.

An unchanged file costs a ``stat`` and, only when size, mode and owner match, one
streamed hash; it is never written. The result is a ``Plan``: the files to add,
update and remove, and the commands that follow from them (each ``check``,
``on_change`` and ``health`` command once, for the files that changed; a removed file
brings the commands of its old entry). Not for: carrying the plan out (transaction.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import grp
import logging
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from applier import _fs
from applier.commands import unique
from applier.errors import PathPolicyError, ValidationFailedError
from applier.manifest import Command, FileEntry, HostEntry
from applier.paths import HostLayout, resolve_target

ChangeKind = Literal["add", "update", "remove"]
CommandKind = Literal["check", "on_change", "health"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One managed path to add, update or remove, with its entries before and after."""

    kind: ChangeKind
    path: str  # as the manifest names it
    real: str  # where it lands after directory symlinks (host path, not under root)
    new: FileEntry | None
    old: FileEntry | None
    reason: str = ""
    # What is on disk is not what the current bundle put there (a file the tool never
    # managed, or one changed out of band): it is saved before it is replaced or removed.
    save: bool = False

    @property
    def entry(self) -> FileEntry:
        entry = self.new or self.old
        if entry is None:
            raise ValueError(f"change of {self.path} has neither a new nor an old entry")
        return entry


@dataclass(frozen=True)
class Plan:
    """What applying an entry changes on this host, and which paths stay as they are."""

    changes: tuple[Change, ...]
    unchanged: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.changes

    def by_kind(self, kind: ChangeKind) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    def commands(self, kind: CommandKind) -> list[Command]:
        def of(c: Change) -> Iterable[Command]:
            return getattr(c.entry, kind)  # type: ignore[no-any-return]
        return unique(cmd for c in self.changes for cmd in of(c))

    def to_dict(self) -> dict[str, object]:
        return {
            "add": [c.path for c in self.by_kind("add")],
            "update": [{"path": c.path, "reason": c.reason} for c in self.by_kind("update")],
            "remove": [c.path for c in self.by_kind("remove")],
            "save": [c.path for c in self.changes if c.save],
            "unchanged": len(self.unchanged),
            "check": [c.run for c in self.commands("check")],
            "on_change": [c.run for c in self.commands("on_change")],
            "health": [c.run for c in self.commands("health")],
        }


# Names already looked up in this operation (see ``accounts_cached``); None outside one.
_accounts: contextvars.ContextVar[dict[tuple[str, str], int] | None] = contextvars.ContextVar(
    "accounts", default=None)


@contextlib.contextmanager
def accounts_cached() -> Iterator[None]:
    """Within this block, each owner and group name is looked up once.

    ``getpwnam``/``getgrnam`` read the account databases on every call (two file
    opens and a scan per managed file, 1,100 for a 550-file host). One operation
    under the host lock sees one answer per name; the next operation (``watch``
    runs many in one process) looks again, so an account added meanwhile is seen.
    """
    token = _accounts.set({})
    try:
        yield
    finally:
        _accounts.reset(token)


def _account_id(kind: str, name: str) -> int:
    if name.isdigit():
        return int(name)
    cache = _accounts.get()
    if cache is not None and (kind, name) in cache:
        return cache[(kind, name)]
    value = pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
    if cache is not None:
        cache[(kind, name)] = value
    return value


def ids_for(entry: FileEntry) -> tuple[int, int]:
    """The uid and gid a file must have; unknown names are a validation failure."""
    try:
        uid = _account_id("user", entry.owner)
        gid = _account_id("group", entry.group)
    except KeyError:
        raise ValidationFailedError(
            f"{entry.path}: owner {entry.owner!r} or group {entry.group!r} does not exist "
            "on this host") from None
    return uid, gid


def difference(disk_path: str | os.PathLike[str], entry: FileEntry) -> str | None:
    """Why the file on disk is not what ``entry`` says, or None if it is."""
    try:
        st = os.lstat(disk_path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:  # a name too long for this root, a directory we may not search
        raise _fs.io_error(e, f"cannot examine {entry.path}") from e
    if stat.S_ISLNK(st.st_mode):
        return "replaced by a symlink"
    if stat.S_ISDIR(st.st_mode):
        return "replaced by a directory"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    uid, gid = ids_for(entry)
    if st.st_size != entry.size:
        return "content"
    try:
        digest, _ = _fs.hash_file(disk_path)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if digest != entry.sha256:
        return "content"
    if stat.S_IMODE(st.st_mode) != entry.mode:
        return f"mode {stat.S_IMODE(st.st_mode):04o}"
    if (st.st_uid, st.st_gid) != (uid, gid):
        return "owner"
    return None


def _not_as_left(disk_path: Path, old: FileEntry | None) -> bool:
    """Whether the file on disk is other than what the current bundle put there."""
    if old is None:
        return True
    try:
        return difference(disk_path, old) is not None
    except ValidationFailedError:  # its owner is gone from this host: it changed
        return True


def make_plan(layout: HostLayout, new: HostEntry, old: HostEntry | None,
              prefixes: tuple[str, ...]) -> Plan:
    """Compare ``new`` with the disk and ``old``; raise if a path breaks host policy.

    Two rules keep what the tool did not write: a directory is never replaced or
    removed (a path the bundle wants as a file is refused; a dropped one is left in
    place), and anything else on disk that is not what the current bundle put there is
    marked ``save`` (the caller copies it aside before it is overwritten or removed).
    Two paths that are one file on this host (through a directory symlink) are refused.
    """
    changes: list[Change] = []
    unchanged: list[str] = []
    dirs: dict[str, str] = {}
    new_paths = new.by_path()
    old_paths = old.by_path() if old is not None else {}
    reals: dict[str, str] = {}  # host path -> the manifest path that lands there
    for entry in new.files:
        real = resolve_target(layout, entry.path, prefixes, dirs)
        if real in reals:
            raise PathPolicyError(f"{entry.path}: the same file on this host as "
                                  f"{reals[real]} (through a directory symlink)")
        reals[real] = entry.path
        disk = layout.on_disk(real)
        why = difference(disk, entry)
        before = old_paths.get(entry.path)
        if why is None:
            unchanged.append(entry.path)
        elif why == "missing":
            changes.append(Change("add", entry.path, real, entry, before, "missing"))
        elif why == "replaced by a directory":
            raise PathPolicyError(f"{entry.path}: a directory is in the way on this host "
                                  "(the tool never replaces a directory; move it away)")
        else:
            changes.append(Change("update", entry.path, real, entry, before, why,
                                  save=_not_as_left(disk, before)))
    for path, entry in old_paths.items():
        if path in new_paths:
            continue
        real = resolve_target(layout, path, prefixes, dirs)
        if real in reals:  # the new bundle manages this very file under another name,
            continue       # or another dropped path already removes it
        reals[real] = path
        disk = layout.on_disk(real)
        if not os.path.lexists(disk):
            continue
        if disk.is_dir() and not disk.is_symlink():
            logger.warning("%s: no longer managed, but left in place: it is a directory "
                           "now, and the tool never removes one", path)
            continue
        changes.append(Change("remove", path, real, None, entry, "no longer managed",
                              save=_not_as_left(disk, entry)))
    return Plan(tuple(changes), tuple(unchanged))
