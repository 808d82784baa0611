"""Drift: managed files that no longer match the current bundle, found, saved, repaired.

``check`` compares every file of the current (retained) bundle with the disk, using
``plan.difference``: a ``stat`` per file and one streamed hash only when size, type
match, so a check costs what hashing the files costs. Each file's effective policy is
the host config's ``drift`` override (the longest matching path or directory prefix)
or else the manifest entry's ``drift``: ``revert`` (repair), ``report`` (detect, never
touch) or ``ignore`` (skip, for files a service legitimately rewrites).

``fix`` repairs the ``revert`` files through the host's own transaction (``Host._transact``
with a plan of just those files), so validation, ``check``, the ``on_change`` commands
of the affected files only, health checks, rollback and the audit log are exactly those
of an apply. Before anything is overwritten, the out-of-band versions are saved under
``state/drift/<id>/`` (content, mode, owner, kind, with ``index.json``), so nothing is
lost: ``history`` lists them, ``restore`` writes one set out into a directory the
operator chooses (never back over the managed path, which the next repair would
revert again) so it can be reviewed and committed to the repo.

State kept here (``state/drift/``)::

    <id>/index.json       one saved set: when, by whom, which bundle, each file's
                          path, kind, mode, uid/gid (and names), size, sha256, link
    <id>/files/<n>        the saved content (a copy of a directory for kind directory)
    last-check.json       the last check: when, how many files, what drifted

Not for: deciding what an apply changes (plan.py) or printing (cli.py).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from applier import _fs, policy
from applier.config import HostConfig, within
from applier.errors import ApplierError, HostIOError, StateError
from applier.manifest import DriftPolicy, FileEntry, HostEntry
from applier.paths import HostLayout, resolve_target
from applier.plan import Change, Plan, difference, ids_for
from applier.verify import verify_manifest

if TYPE_CHECKING:
    from applier.apply import Host, Report

logger = logging.getLogger(__name__)

DriftKind = Literal["missing", "symlink", "directory", "special", "content", "mode", "owner",
                    "unreadable", "error"]
_KIND_OF_REASON: dict[str, DriftKind] = {
    "missing": "missing",
    "replaced by a symlink": "symlink",
    "replaced by a directory": "directory",
    "not a regular file": "special",
    "content": "content",
    "owner": "owner",
}
LAST_CHECK = "last-check.json"
INDEX = "index.json"
# Diffs are for people: larger or binary files get a one-line summary instead.
MAX_DIFF_BYTES = 1 << 20
MAX_DIFF_LINES = 2000


def effective_policy(entry: FileEntry, config: HostConfig) -> DriftPolicy:
    """Host override (longest matching path or directory prefix) > the manifest's policy."""
    matches = [p for p in config.drift if within(entry.path, p)]
    if not matches:
        return entry.drift
    return config.drift[max(matches, key=len)]


def kind_of(reason: str) -> DriftKind:
    if reason in _KIND_OF_REASON:
        return _KIND_OF_REASON[reason]
    if reason.startswith("mode"):
        return "mode"
    if reason.startswith("unreadable"):
        return "unreadable"
    return "error"


@dataclass(frozen=True)
class DiskState:
    """What is at a managed path now (lstat), for the report and the saved index."""

    kind: str  # file, symlink, directory, special
    mode: int
    uid: int
    gid: int
    size: int
    link: str | None = None

    @classmethod
    def of(cls, path: Path) -> DiskState | None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            kind, link = "symlink", os.readlink(path)
        else:
            link = None
            kind = ("file" if stat.S_ISREG(st.st_mode) else
                    "directory" if stat.S_ISDIR(st.st_mode) else "special")
        return cls(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, link)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mode": f"{self.mode:04o}", "uid": self.uid,
                "gid": self.gid, "owner": _user(self.uid), "group": _group(self.gid),
                "size": self.size, "link": self.link}


@dataclass(frozen=True)
class Drifted:
    """One managed file that differs from the bundle."""

    path: str
    real: str
    kind: DriftKind
    reason: str
    policy: DriftPolicy
    entry: FileEntry
    disk: DiskState | None
    diff: str | None = None

    @property
    def fixable(self) -> bool:
        return self.policy == "revert" and self.kind != "error"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "reason": self.reason,
                "policy": self.policy, "fixable": self.fixable,
                "expected": {"sha256": self.entry.sha256, "size": self.entry.size,
                             "mode": f"{self.entry.mode:04o}", "owner": self.entry.owner,
                             "group": self.entry.group},
                "disk": None if self.disk is None else self.disk.to_dict(),
                "diff": self.diff}


@dataclass
class DriftReport:
    """The result of one check (and, after ``fix``, of the repair)."""

    bundle_id: str | None
    checked_at: int
    checked: int = 0
    ignored: list[str] = field(default_factory=list)
    drifted: list[Drifted] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    saved: str | None = None
    repair: Report | None = None

    @property
    def remaining(self) -> list[Drifted]:
        """Drift still on disk: everything found, minus what a repair fixed."""
        return [d for d in self.drifted if d.path not in self.fixed]

    def to_dict(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "checked_at": self.checked_at,
                "checked": self.checked, "ignored": self.ignored,
                "drifted": [d.to_dict() for d in self.drifted],
                "fixed": self.fixed, "remaining": [d.path for d in self.remaining],
                "saved": self.saved,
                "repair": None if self.repair is None else self.repair.to_dict()}


# -- checking ---------------------------------------------------------------------------


def compare(layout: HostLayout, entry: HostEntry, config: HostConfig,
            content: Callable[[str], Path] | None = None, with_diff: bool = True,
            now: int = 0) -> DriftReport:
    """Compare every file of ``entry`` with the disk. Reads only; ``content`` finds the
    bundle's version of a blob (for diffs)."""
    report = DriftReport(None, now)
    dirs: dict[str, str] = {}
    for f in entry.files:
        pol = effective_policy(f, config)
        if pol == "ignore":
            report.ignored.append(f.path)
            continue
        report.checked += 1
        try:
            real = resolve_target(layout, f.path, config.allowed_prefixes, dirs)
            reason = difference(layout.on_disk(real), f)
        except ApplierError as e:
            # A directory on the way became a link out of bounds, an owner vanished...:
            # reported, never repaired automatically.
            report.drifted.append(Drifted(f.path, f.path, "error", str(e), pol, f, None))
            continue
        if reason is None:
            continue
        disk_path = layout.on_disk(real)
        disk = DiskState.of(disk_path)
        kind = kind_of(reason)
        detail = _detail(kind, reason, f, disk)
        diff = None
        if with_diff and kind == "content" and content is not None:
            diff = unified_diff(content(f.sha256), disk_path, f.path)
        report.drifted.append(Drifted(f.path, real, kind, detail, pol, f, disk, diff))
    return report


def _detail(kind: DriftKind, reason: str, f: FileEntry, disk: DiskState | None) -> str:
    """The reason, plus mode/owner differences that ``difference`` stops before."""
    if disk is None or disk.kind != "file" or kind not in ("content", "mode", "owner"):
        if kind == "symlink" and disk is not None:
            return f"{reason} (-> {disk.link})"
        return reason
    parts = ["content changed" if kind == "content" else ""]
    if disk.mode != f.mode:
        parts.append(f"mode {disk.mode:04o}, expected {f.mode:04o}")
    try:
        uid, gid = ids_for(f)
    except ApplierError:
        uid, gid = disk.uid, disk.gid
    if (disk.uid, disk.gid) != (uid, gid):
        parts.append(f"owner {_user(disk.uid)}:{_group(disk.gid)}, expected "
                     f"{f.owner}:{f.group}")
    return "; ".join(p for p in parts if p) or reason


def unified_diff(ours: Path, disk: Path, name: str) -> str | None:
    """A unified diff bundle -> disk for two UTF-8 text files; None for binary or big."""
    try:
        if ours.stat().st_size > MAX_DIFF_BYTES or os.lstat(disk).st_size > MAX_DIFF_BYTES:
            return None
        a = _text(ours.read_bytes())
        fd = os.open(disk, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            b = _text(f.read(MAX_DIFF_BYTES + 1))
    except OSError:
        return None
    if a is None or b is None:
        return None
    import difflib  # noqa: PLC0415 - only for drifted text files; status imports this module

    lines = list(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                      fromfile=f"{name} (bundle)", tofile=f"{name} (disk)"))
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"... {len(lines) - MAX_DIFF_LINES} more lines\n"]
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in lines)


def _text(data: bytes) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def check(host: Host, with_diff: bool = True) -> DriftReport:
    """Compare the current bundle with the disk (under the lock, after recovery)."""
    with host.locked():
        host.recover()
        current = host.state.current()
        if current.bundle_id is None:
            report = DriftReport(None, int(host.clock()))
        else:
            entry = host.state.get_retained(current.bundle_id).host_entry(host.config.host)
            if entry is None:
                raise StateError(f"current bundle {current.bundle_id} has no files for host "
                                 f"{host.config.host!r}")
            report = compare(host.layout, entry, host.config, host.state.object_path,
                             with_diff, int(host.clock()))
            report.bundle_id = current.bundle_id
        _record_check(host, report)
        return report


# -- repairing --------------------------------------------------------------------------


def fix(host: Host, with_diff: bool = True) -> DriftReport:
    """Check, save what will be overwritten, then repair every ``revert`` file in one
    transaction. Raises like an apply when validation or health fails (rolled back)."""
    with host.locked():
        host.recover()
        current = host.state.current()
        now = int(host.clock())
        if current.bundle_id is None:
            report = DriftReport(None, now)
            _record_check(host, report)
            return report
        retained = host.state.get_retained(current.bundle_id)
        # Re-verify against today's trust, as rollback does: a revoked key's bundle is
        # not something to re-assert.
        verified = verify_manifest(retained.manifest_bytes, retained.signature_bytes,
                                   host.trust(), host.now(current), host.config.host)
        entry = policy.host_entry(verified.manifest, host.config)
        report = compare(host.layout, entry, host.config, host.state.object_path,
                         with_diff, now)
        report.bundle_id = current.bundle_id
        todo = [d for d in report.drifted if d.fixable]
        if not todo:
            _record_check(host, report)
            return report
        lacking = [d.path for d in todo if not host.state.has_object(d.entry.sha256)]
        if lacking:
            raise StateError(f"the content store lacks the bundle's version of {lacking[0]}; "
                             f"re-apply bundle {current.bundle_id} to repair")
        who = invoker()
        report.saved = save(host.layout, todo, current.bundle_id, who, now).id
        plan = Plan(tuple(Change("add" if d.kind == "missing" else "update", d.path, d.real,
                                 d.entry, d.entry, d.reason) for d in todo))
        extra = {"by": who, "saved": report.saved,
                 "drift": [{"path": d.path, "kind": d.kind, "reason": d.reason}
                           for d in todo]}
        try:
            report.repair = host._transact(verified, entry, None, "drift-fix",
                                           False, current, plan=plan, audit=extra)
        except BaseException:
            _record_check(host, report)
            raise
        report.fixed = [d.path for d in todo]
        _record_check(host, report)
        return report


def invoker() -> dict[str, Any]:
    """Who runs this: the user, whom sudo came from, the systemd invocation if any."""
    uid = os.getuid()
    who: dict[str, Any] = {"user": _user(uid), "uid": uid}
    if os.environ.get("SUDO_USER"):
        who["sudo_user"] = os.environ["SUDO_USER"]
    if os.environ.get("INVOCATION_ID"):
        who["systemd_invocation"] = os.environ["INVOCATION_ID"]
    return who


# -- saved versions ---------------------------------------------------------------------


@dataclass(frozen=True)
class SavedSet:
    id: str
    time: int
    bundle_id: str | None
    by: dict[str, Any]
    files: list[dict[str, Any]]
    # What overwrote them: a repair (drift-fix), or an apply or rollback that replaced
    # or removed files the current bundle had not put there.
    purpose: str = "drift-fix"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "bundle_id": self.bundle_id, "by": self.by,
                "files": self.files, "purpose": self.purpose}


@dataclass(frozen=True)
class Displaced:
    """A file an apply or rollback will replace or remove that is not the current
    bundle's: never managed by it (``unmanaged``) or changed out of band (``drifted``)."""

    path: str
    real: str
    kind: str
    reason: str


def displaced(plan: Plan) -> list[Displaced]:
    """What ``plan`` marks to be saved before it is carried out."""
    return [Displaced(c.path, c.real, "unmanaged" if c.old is None else "drifted",
                      c.reason if c.kind == "update" else "removed by the new bundle")
            for c in plan.changes if c.save]


def save(layout: HostLayout, drifted: Sequence[Drifted | Displaced], bundle_id: str | None,
         by: dict[str, Any], now: int, purpose: str = "drift-fix") -> SavedSet:
    """Copy every out-of-band version that a repair (or an apply) will overwrite into
    the state dir.

    Built in a hidden temp directory and renamed into place, so a set is complete or
    absent. Copies are 0600 (they may hold secrets); the index records the real mode.
    """
    base = layout.drift_saves
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    set_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + _fs.random_hex(3)
    tmp = base / f".tmp-{set_id}"
    files: list[dict[str, Any]] = []
    try:
        (tmp / "files").mkdir(parents=True, mode=0o700)
        for n, d in enumerate(drifted):
            disk = layout.on_disk(d.real)
            state = DiskState.of(disk)
            record: dict[str, Any] = {"path": d.path, "drift": d.kind, "reason": d.reason,
                                      "kind": "missing" if state is None else state.kind}
            if state is not None:
                record.update(state.to_dict())
                dst = tmp / "files" / str(n)
                if state.kind == "file":
                    _fs.copy_file(disk, dst, 0o600)
                    record["sha256"], _ = _fs.hash_file(dst)
                    record["saved"] = f"files/{n}"
                elif state.kind == "directory":
                    shutil.copytree(disk, dst, symlinks=True)
                    record["saved"] = f"files/{n}"
            files.append(record)
        saved = SavedSet(set_id, now, bundle_id, by, files, purpose)
        _fs.atomic_write(tmp / INDEX, _dumps(saved.to_dict()), 0o600)
        os.sync()  # the copies must be durable before the originals are overwritten
        os.rename(tmp, base / set_id)
        _fs.fsync_dir(base)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _fs.io_error(e, f"cannot save the files {purpose} would overwrite under {base}; "
                              "nothing changed") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %d file(s) as %s before %s", len(files), set_id, purpose)
    return saved


def history(layout: HostLayout) -> list[SavedSet]:
    """Every saved set, oldest first."""
    base = layout.drift_saves
    out: list[SavedSet] = []
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            data = json.loads((d / INDEX).read_bytes())
            out.append(SavedSet(data["id"], data["time"], data["bundle_id"], data["by"],
                                data["files"], data.get("purpose", "drift-fix")))
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable saved drift set %s: %s", d.name, e)
    return out


def get_saved(layout: HostLayout, set_id: str) -> SavedSet:
    sets = history(layout)
    matches = [s for s in sets if s.id == set_id] or [s for s in sets
                                                      if s.id.startswith(set_id)]
    if len(matches) != 1:
        raise StateError(f"no saved drift set {set_id!r}" if not matches
                         else f"saved drift set id {set_id!r} is ambiguous")
    return matches[0]


def default_restore_dir(set_id: str) -> Path:
    return Path.cwd() / f"gitops-drift-{set_id}"


def restore(layout: HostLayout, set_id: str, dest: Path | None = None,
            only: str | None = None) -> tuple[SavedSet, list[Path]]:
    """Write a saved set out under ``dest`` at each file's host path (``dest/etc/...``).

    Never overwrites: an existing destination file is an error. Content and mode come
    back; ownership is left to the operator (the copy is for review and a commit).
    """
    saved = get_saved(layout, set_id)
    dest = dest or default_restore_dir(saved.id)
    records = [r for r in saved.files if only is None or r["path"] == only]
    if only is not None and not records:
        raise StateError(f"saved drift set {saved.id} has no {only}")
    written: list[Path] = []
    src_dir = layout.drift_saves / saved.id
    try:
        for r in records:
            target = dest / r["path"].lstrip("/")
            kind = r.get("kind")
            if kind not in ("file", "symlink", "directory"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                _fs.copy_file(src_dir / r["saved"], target, 0o600)
                os.chmod(target, int(r["mode"], 8) & 0o777)  # not the umask's idea of it
            elif kind == "symlink":
                os.symlink(r["link"], target)
            else:
                shutil.copytree(src_dir / r["saved"], target, symlinks=True)
            written.append(target)
    except FileExistsError as e:
        raise HostIOError(f"{e.filename}: already exists; restore into an empty directory "
                          "(--to DIR)") from e
    except OSError as e:
        raise _fs.io_error(e, f"cannot restore saved drift set {saved.id} into {dest}") from e
    return saved, written


# -- the last check (status, metrics) ---------------------------------------------------


def _record_check(host: Host, report: DriftReport) -> None:
    """Keep the last check's summary; audit when the set of drifted files changed."""
    last = last_check(host.layout)
    drifted = sorted(d.path for d in report.drifted)
    before = None if last is None else sorted(x["path"] for x in last.get("drifted", []))
    # A repair has its own audit record (drift-fix); a check is recorded when what
    # drifted changed, not every time a timer looks.
    if drifted and not report.fixed and before != drifted:
        host.state.audit("drift", bundle_id=report.bundle_id, host=host.config.host,
                         by=invoker(), fixed=report.fixed, saved=report.saved,
                         drifted=[{"path": d.path, "kind": d.kind, "policy": d.policy}
                                  for d in report.drifted])
    summary = {"time": report.checked_at, "bundle_id": report.bundle_id,
               "checked": report.checked, "ignored": len(report.ignored),
               "drifted": [{"path": d.path, "kind": d.kind, "policy": d.policy}
                           for d in report.drifted],
               "fixed": report.fixed, "remaining": len(report.remaining),
               "saved": report.saved}
    host.layout.drift_saves.mkdir(parents=True, exist_ok=True, mode=0o700)
    _fs.atomic_write(host.layout.drift_saves / LAST_CHECK, _dumps(summary), 0o600)


def last_check(layout: HostLayout) -> dict[str, Any] | None:
    try:
        data = json.loads((layout.drift_saves / LAST_CHECK).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status(layout: HostLayout) -> dict[str, Any]:
    """The drift fields of ``gitops-apply status``."""
    last = last_check(layout)
    saved = len(history(layout))
    if last is None:
        return {"last_check": None, "checked": None, "drifted": None, "remaining": None,
                "drifted_files": [], "saved_sets": saved}
    return {"last_check": last.get("time"), "checked": last.get("checked"),
            "drifted": len(last.get("drifted", [])), "remaining": last.get("remaining"),
            "drifted_files": last.get("drifted", []), "saved_sets": saved}


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode() + b"\n"
