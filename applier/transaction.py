"""Crash-safe transactions over a host's managed files, and their recovery.

The rule (after RAUC/Mender's "fully in or fully out", SQLite's rollback journal):
before the first byte lands beside a target, ``journal.json`` is written and fsynced
with every path the transaction may create: staged temp files (``.gitops-<tx>-<n>.new``),
backups of old versions (``.gitops-<tx>-<n>.old``, a hard link, so the old file stays
in place until the rename) and directories it creates. Each step is then one atomic
filesystem operation, and every state between two steps can be rolled back. The
journal names host paths (``/etc/...``), never where ``--root`` put them, so a root
recovered under another mount point (a rescue system) is still recovered in place:

* update: temp written -> ``link(target, backup)`` -> ``rename(temp, target)``
* add:    temp written -> ``rename(temp, target)``
* remove: ``rename(target, backup)``

The transaction commits when ``current.json`` names its txid (state.py). Recovery
(``recover``), which every command runs first, reads an unfinished journal and

* if ``current.json`` holds the journal's txid: rolls *forward*, deleting backups;
* otherwise rolls *back*: each backup is renamed over its target, each added target
  and temp is removed, created directories are removed if empty, and, if the journal
  says services were already told (phase ``services``), the ``on_change`` commands run
  again so they read the old files: the old entries' commands first (the old bundle
  knows how to reload its own config), then any the new bundle added.

Both directions are idempotent, so a crash during recovery is recovered the same way.
Recovery also removes the leftovers of a crash that journals nothing: staged blobs
and half-written ``.*.tmp-*`` state files. Before the journal is written, ``prepare``
checks that every target filesystem has room for the temp copies, so running out of
disk fails with the number of bytes needed and nothing changed.
Not for: deciding what changes (plan.py) or policy (policy.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from applier import _faults, _fs
from applier.commands import CommandResult, unique
from applier.errors import HostIOError, StateError, StoreDamagedError
from applier.manifest import Command
from applier.paths import HostLayout
from applier.plan import Plan, ids_for

logger = logging.getLogger(__name__)

# Many small files: one sync(2) beats an fsync per file (tar + sync is the yardstick).
SYNC_ALL_THRESHOLD = 32
_JOURNAL_JSON = json.JSONEncoder(sort_keys=True)


@dataclass
class Op:
    """One journaled file operation: where its new content waits, where the old went."""

    kind: str
    path: str  # manifest path
    real: str  # host path, resolved
    temp: str | None = None
    backup: str | None = None
    sha256: str | None = None


@dataclass
class Journal:
    """The in-flight transaction as written to journal.json before the first swap."""

    txid: str
    purpose: str
    new_bundle: str | None
    ops: list[Op]
    dirs: list[str]
    on_change: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "prepared"
    # Whether ``new_bundle`` was retained before this transaction. If not, a rollback
    # removes what the commit may have retained of it: a bundle that never took effect
    # must not be listed as applied, count against ``retain`` or be a rollback target.
    # (A journal written before this field: True, the old behaviour.)
    new_retained: bool = True

    def to_bytes(self) -> bytes:
        """JSON with an op per line, to read by hand if recovery cannot run.

        Written twice per transaction; ``json.dumps(..., indent=1)`` takes the pure
        Python encoder (with ``asdict`` copying every op), about 30 us an op.
        """
        ops = ",\n".join(map(_JOURNAL_JSON.encode, map(vars, self.ops)))
        members = (f"{_JOURNAL_JSON.encode(key)}: "
                   + ((f"[\n{ops}\n]" if ops else "[]") if key == "ops"
                      else _JOURNAL_JSON.encode(value))
                   for key, value in sorted(vars(self).items()))
        return ("{" + ", ".join(members) + "}\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Journal:
        d = json.loads(data)
        d["ops"] = [Op(**o) for o in d["ops"]]
        return cls(**d)


def new_txid() -> str:
    return _fs.random_hex(6)


def _rebase(journal: Journal, path: Callable[[str], str]) -> Journal:
    def opt(p: str | None) -> str | None:
        return None if p is None else path(p)

    ops = [Op(o.kind, o.path, o.real, opt(o.temp), opt(o.backup), o.sha256)
           for o in journal.ops]
    return Journal(journal.txid, journal.purpose, journal.new_bundle, ops,
                   [path(d) for d in journal.dirs], journal.on_change, journal.phase,
                   journal.new_retained)


def load_journal(layout: HostLayout) -> Journal | None:
    """The unfinished journal, if any, with its host paths placed under this root."""
    try:
        data = layout.journal.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return _rebase(Journal.from_bytes(data), lambda p: str(layout.on_disk(p)))
    except (ValueError, TypeError, KeyError) as e:
        raise StateError(f"{layout.journal}: unreadable journal ({e}); restore by hand from "
                         "the .gitops-*.old files it names") from e


def write_journal(layout: HostLayout, journal: Journal) -> None:
    layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    host = _rebase(journal, lambda p: "/" + os.path.relpath(p, layout.root))
    _fs.atomic_write(layout.journal, host.to_bytes(), 0o600, fault=f"journal-{journal.phase}")


class Transaction:
    """One transaction: prepare (journal, dirs, temps), swap, then commit or roll back."""

    def __init__(self, layout: HostLayout, plan: Plan, content: Callable[[str], Path],
                 purpose: str, new_bundle: str | None) -> None:
        self.layout = layout
        self.plan = plan
        self.content = content
        self.txid = new_txid()
        ops: list[Op] = []
        for n, change in enumerate(plan.changes):
            disk = layout.on_disk(change.real)
            base = str(disk.parent / f".gitops-{self.txid}-{n}")
            ops.append(Op(
                kind=change.kind, path=change.path, real=change.real,
                temp=None if change.kind == "remove" else base + ".new",
                backup=None if change.kind == "add" else base + ".old",
                sha256=change.new.sha256 if change.new else None,
            ))
        retained = new_bundle is None or (layout.bundles / new_bundle / "meta.json").exists()
        self.journal = Journal(self.txid, purpose, new_bundle, ops, self._missing_dirs(),
                               [c.to_dict() for c in restore_commands(plan)],
                               new_retained=retained)

    def _missing_dirs(self) -> list[str]:
        out: list[str] = []
        for change in self.plan.changes:
            d = self.layout.on_disk(change.real).parent
            chain: list[str] = []
            while not d.exists() and d != self.layout.root:
                chain.append(str(d))
                d = d.parent
            out.extend(p for p in reversed(chain) if p not in out)
        return out

    # -- prepare: nothing a service can see changes here -------------------------------

    def prepare(self) -> None:
        self._check_space()
        write_journal(self.layout, self.journal)
        try:
            for d in self.journal.dirs:
                os.mkdir(d, 0o755)
                # mkdir's mode passes through the umask: under a hardened umask (077) a
                # new /etc/nginx/sites would shut nginx's workers out of their config.
                os.chmod(d, 0o755)  # noqa: S103 - what mkdir -p gives under umask 022
                _faults.point("mkdir")
            staged: list[str] = []
            for op, change in zip(self.journal.ops, self.plan.changes, strict=True):
                if op.temp is None or change.new is None:
                    continue
                self._stage(op.temp, change.new.sha256, change.new.mode, *ids_for(change.new))
                staged.append(op.temp)
                _faults.point("stage-file")
            if not _fs.make_durable(staged, SYNC_ALL_THRESHOLD):
                # Without sync(2), each new directory's own entry needs its parent's
                # fsync (the swap syncs the directories the targets are in, not theirs).
                self._fsync_dirs(self.journal.dirs)
            _faults.point("staged-synced")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                need = sum(c.new.size for c in self.plan.changes if c.new is not None)
                raise HostIOError(f"cannot stage files beside their targets: no space left "
                                  f"on device (the new files need {need} bytes)") from e
            raise _fs.io_error(e, "cannot stage files beside their targets") from e

    def _check_space(self) -> None:
        """Refuse before the journal when a target filesystem cannot hold the temps."""
        need: dict[int, tuple[str, int]] = {}
        devices: dict[Path, tuple[int, Path]] = {}  # a target's directory: its device
        for change in self.plan.changes:
            if change.new is None:
                continue
            parent = self.layout.on_disk(change.real).parent
            if parent not in devices:
                d = parent
                while not d.exists() and d != d.parent:
                    d = d.parent
                devices[parent] = (os.stat(d).st_dev, d)
            dev, d = devices[parent]
            where, total = need.get(dev, (str(d), 0))
            # A block per file on top of the bytes: small files still take one.
            need[dev] = (where, total + change.new.size + 4096)
        for where, total in need.values():
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize
            if total > free:
                raise HostIOError(f"{where}: not enough space to stage the new files beside "
                                  f"their targets: need {total} bytes, {free} free")

    def _stage(self, temp: str, sha256: str, mode: int, uid: int, gid: int) -> None:
        """Copy content into a fresh temp file beside its target.

        A blob staged from the bundle in this run was hashed as it streamed in, so it
        is copied in kernel; content-store files may have rotted since they were
        written, so those are re-hashed on the way.
        """
        src = self.content(sha256)
        fresh = Path(src).is_relative_to(self.layout.staging)
        h = hashlib.sha256()
        with open(src, "rb") as fin, _fs.open_exclusive(temp, 0o600) as fout:
            _faults.point("stage-created")
            if fresh:
                _fs.copy_open(fin, fout)
            else:
                while chunk := fin.read(_fs.CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
            fout.flush()
            if os.geteuid() == 0:
                os.fchown(fout.fileno(), uid, gid)
            os.fchmod(fout.fileno(), mode)
        if not fresh and h.hexdigest() != sha256:
            # The store, not the bundle, is at fault: set the copy aside so the next
            # apply of a bundle carrying this content reads it from the payload again
            # (a deferred, not a rejected, bundle under watch).
            damaged = Path(src).with_name(f"{sha256}.damaged")
            os.replace(src, damaged)
            raise StoreDamagedError(f"{src}: stored content does not match its SHA-256 "
                                    f"(damaged on disk, moved to {damaged.name}); apply a "
                                    "bundle that carries it to restore it")

    def _fsync_dirs(self, paths: list[str]) -> None:
        for d in sorted({str(Path(p).parent) for p in paths}):
            _fs.fsync_dir(d)

    # -- swap: each step one atomic operation -------------------------------------------

    def swap(self) -> None:
        try:
            for op in self.journal.ops:
                if op.kind == "update" and op.backup is not None:
                    target = str(self.layout.on_disk(op.real))
                    if stat.S_ISDIR(os.lstat(target).st_mode):
                        os.rename(target, op.backup)
                    else:
                        os.link(target, op.backup, follow_symlinks=False)
                    _faults.point("backup")
            self._fsync_dirs([op.backup for op in self.journal.ops if op.backup])
            _faults.point("backups-synced")
            for op in self.journal.ops:
                target = str(self.layout.on_disk(op.real))
                if op.kind == "remove" and op.backup is not None:
                    os.rename(target, op.backup)
                    _faults.point("remove")
                elif op.temp is not None:
                    os.rename(op.temp, target)
                    _faults.point("rename")
            self._fsync_dirs([str(self.layout.on_disk(op.real)) for op in self.journal.ops])
            _faults.point("swap-synced")
        except OSError as e:
            raise _fs.io_error(e, "cannot swap files into place") from e

    def services_phase(self) -> None:
        """Record that services are about to read the new files (recovery re-runs them)."""
        self.journal.phase = "services"
        write_journal(self.layout, self.journal)

    # -- the two ends ---------------------------------------------------------------------

    def finish(self) -> None:
        """After the commit point: drop backups and the journal."""
        finish(self.layout, self.journal)

    def rollback(self, rerun: Callable[[list[Command]], list[CommandResult]] | None = None,
                 ) -> list[CommandResult]:
        return rollback(self.layout, self.journal, rerun)


def finish(layout: HostLayout, journal: Journal) -> None:
    for op in journal.ops:
        if op.backup and os.path.lexists(op.backup):
            if os.path.isdir(op.backup) and not os.path.islink(op.backup):
                shutil.rmtree(op.backup)
            else:
                os.unlink(op.backup)
            _faults.point("drop-backup")
        if op.temp:
            _fs.remove_quietly(op.temp)
    _fs.remove_quietly(layout.journal)
    _faults.point("journal-removed")
    _fs.fsync_dir(layout.state_dir)


def rollback(layout: HostLayout, journal: Journal,
             rerun: Callable[[list[Command]], list[CommandResult]] | None = None,
             ) -> list[CommandResult]:
    """Put every old file back; idempotent, so it is also the crash recovery."""
    touched: list[str] = []
    for op in reversed(journal.ops):
        target = str(layout.on_disk(op.real))
        if op.kind == "add":
            if op.temp and os.path.lexists(op.temp):
                os.unlink(op.temp)
            elif os.path.lexists(target):
                os.unlink(target)
        else:
            if op.backup and os.path.lexists(op.backup):
                if os.path.isdir(op.backup) and not os.path.islink(op.backup):
                    # The old "file" was a directory: take the new file off it first.
                    _fs.remove_quietly(target)
                os.replace(op.backup, target)
                # rename(2) is a no-op when both names are links to one inode.
                _fs.remove_quietly(op.backup)
            if op.temp:
                _fs.remove_quietly(op.temp)
        _faults.point("restore")
        touched.append(target)
    for d in reversed(journal.dirs):
        try:
            os.rmdir(d)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise
        else:
            _faults.point("rmdir")
    for d in sorted({str(Path(p).parent) for p in touched} | {str(Path(d).parent)
                                                            for d in journal.dirs}):
        with contextlib.suppress(FileNotFoundError):
            _fs.fsync_dir(d)
    _faults.point("restored-synced")
    results: list[CommandResult] = []
    if journal.phase == "services" and rerun is not None:
        results = rerun([Command(**c) for c in journal.on_change])
    if not journal.new_retained and journal.new_bundle is not None:
        # The commit may have retained the new bundle before the crash (meta.json is
        # written before current.json): it never took effect, so it is not kept.
        shutil.rmtree(layout.bundles / journal.new_bundle, ignore_errors=True)
        _faults.point("unretain")
    _fs.remove_quietly(layout.journal)
    _faults.point("journal-removed")
    with contextlib.suppress(FileNotFoundError):
        _fs.fsync_dir(layout.state_dir)
    return results


def recover(layout: HostLayout, committed_txid: str | None,
            rerun: Callable[[list[Command]], list[CommandResult]] | None = None,
            ) -> dict[str, Any] | None:
    """Finish an interrupted transaction; returns what was done, for the audit log."""
    journal = load_journal(layout)
    if journal is None:
        _clean_staging(layout)
        return None
    try:
        if committed_txid == journal.txid:
            finish(layout, journal)
            action = "rolled forward (it had committed)"
            results: list[CommandResult] = []
        else:
            results = rollback(layout, journal, rerun)
            action = "rolled back"
    except OSError as e:
        raise HostIOError(f"recovery of transaction {journal.txid} failed: {e}") from e
    _clean_staging(layout)
    logger.warning("recovered interrupted %s transaction %s: %s", journal.purpose,
                   journal.txid, action)
    return {"txid": journal.txid, "purpose": journal.purpose, "bundle": journal.new_bundle,
            "action": action, "files": [op.path for op in journal.ops],
            "commands": [r.to_dict() for r in results]}


def restore_commands(plan: Plan) -> list[Command]:
    """The ``on_change`` commands that make services re-read the old files."""
    old = [cmd for c in plan.changes if c.old is not None for cmd in c.old.on_change]
    new = [cmd for c in plan.changes if c.new is not None for cmd in c.new.on_change]
    return unique(old + new)


def pending(layout: HostLayout) -> bool:
    """Whether a crash left anything to recover or clean (cheap: a stat and two globs)."""
    if layout.journal.exists():
        return True
    staged = layout.staging.is_dir() and any(layout.staging.iterdir())
    return staged or any(layout.state_dir.glob(".*.tmp-*")) or any(
        layout.bundles.glob("*/.*.tmp-*"))


def _clean_staging(layout: HostLayout) -> None:
    """Drop what a crash leaves that no journal names: staged blobs, state temp files."""
    if layout.staging.is_dir():
        for d in layout.staging.iterdir():
            shutil.rmtree(d, ignore_errors=True)
    if layout.state_dir.is_dir():
        for p in layout.state_dir.glob(".*.tmp-*"):
            _fs.remove_quietly(p)
    if layout.bundles.is_dir():
        for p in layout.bundles.glob("*/.*.tmp-*"):
            _fs.remove_quietly(p)
