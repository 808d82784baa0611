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
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from applier import _fs
from applier.commands import unique
from applier.errors import ValidationFailedError
from applier.manifest import Command, FileEntry, HostEntry
from applier.paths import HostLayout, resolve_target

ChangeKind = Literal["add", "update", "remove"]
CommandKind = Literal["check", "on_change", "health"]


@dataclass(frozen=True)
class Change:
    """One managed path to add, update or remove, with its entries before and after."""

    kind: ChangeKind
    path: str  # as the manifest names it
    real: str  # where it lands after directory symlinks (host path, not under root)
    new: FileEntry | None
    old: FileEntry | None
    reason: str = ""

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


def make_plan(layout: HostLayout, new: HostEntry, old: HostEntry | None,
              prefixes: tuple[str, ...]) -> Plan:
    """Compare ``new`` with the disk and ``old``; raise if a path breaks host policy."""
    changes: list[Change] = []
    unchanged: list[str] = []
    dirs: dict[str, str] = {}
    new_paths = new.by_path()
    old_paths = old.by_path() if old is not None else {}
    for entry in new.files:
        real = resolve_target(layout, entry.path, prefixes, dirs)
        why = difference(layout.on_disk(real), entry)
        if why is None:
            unchanged.append(entry.path)
        elif why == "missing":
            changes.append(Change("add", entry.path, real, entry, old_paths.get(entry.path),
                                  "missing"))
        else:
            changes.append(Change("update", entry.path, real, entry, old_paths.get(entry.path),
                                  why))
    for path, entry in old_paths.items():
        if path in new_paths:
            continue
        real = resolve_target(layout, path, prefixes, dirs)
        if os.path.lexists(layout.on_disk(real)):
            changes.append(Change("remove", path, real, None, entry, "no longer managed"))
    return Plan(tuple(changes), tuple(unchanged))
