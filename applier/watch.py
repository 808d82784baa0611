"""Watch mode: take bundles from inbox directories (a USB stick, a drop directory).

Each poll lists ``*.tar``, ``*.tar.gz``, ``*.tgz`` and ``*.tar.zst`` files (hidden names,
such as rsync's temp files, are not bundles). A file is *ready* when a ``<name>.done``
marker exists, or when its size and mtime have not changed for ``settle`` seconds
(two polls at least): a copy in progress is never read. Ready bundles are verified
up to their signature to learn their sequence, then tried newest first through
``Host.apply``; the first that applies wins, the older ones are superseded.

What happens to a bundle that is not applied depends on whose fault it is:

* *rejected* (it failed verification, this host's policy, validation or health):
  moved to ``INBOX/rejected/`` with the reason in ``rejected/<name>.reason``; when the
  inbox is read-only (the shipped mount unit mounts the stick ``ro``), the reason goes
  to ``state/watch/rejected/<name>.reason`` and the file stays where it is;
* *skipped* (not for this host, already applied, older than what the host runs):
  left in place, because one stick serves many hosts;
* *deferred* (the host was busy or its disk full): retried after ``RETRY_AFTER``.

Every bundle that was applied, rejected or skipped is remembered in
``state/watch/seen.json`` by name, size and mtime, so it is never tried again, even
by the next ``--once`` run; a bundle that failed checks is also in ``bad.json``.
Any failure is logged and the loop goes on. ``stop`` (SIGTERM) is honoured between
bundles: an apply in progress finishes (it is one transaction) before the loop exits.
Not for: the apply itself (apply.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from applier import _fs, _log, trust_store
from applier.bundle import BundleFile
from applier.errors import (
    ApplierError,
    HostConfigError,
    HostIOError,
    HostNotInBundleError,
    LockedError,
    ReplayError,
    StateError,
)
from applier.trust import TrustRoot
from applier.verify import verify_manifest

if TYPE_CHECKING:
    from applier.apply import Host

logger = logging.getLogger(__name__)

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst")
DONE = ".done"
REJECTED = "rejected"
RETRY_AFTER = 60.0
MAX_SEEN = 1000

Result = Literal["applied", "rejected", "skipped", "deferred"]


@dataclass(frozen=True)
class Outcome:
    path: Path
    result: Result
    reason: str
    bundle_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "result": self.result, "reason": self.reason,
                "bundle_id": self.bundle_id}


@dataclass(frozen=True)
class Sighting:
    size: int
    mtime_ns: int
    first_seen: float


def is_bundle_name(name: str) -> bool:
    return not name.startswith(".") and name.endswith(SUFFIXES)


def _key(path: Path, size: int, mtime_ns: int) -> str:
    return f"{path.resolve()}|{size}|{mtime_ns}"


def _stale(key: str) -> bool:
    """Whether a ledger key no longer describes a file in the inbox: gone, or replaced
    (a stick that reuses one name keeps only the entry of its current version)."""
    path, size, mtime_ns = key.rsplit("|", 2)
    try:
        st = os.stat(path)
    except OSError:
        return True
    return (str(st.st_size), str(st.st_mtime_ns)) != (size, mtime_ns)


def _exists(path: Path) -> bool:
    """``path.exists()`` that takes a name too long (or any error) for absence."""
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _shown(path: Path | str) -> str:
    """A path as text for a log or a reason (``_log.printable``)."""
    return _log.printable(str(path))


def _utf8(text: str) -> bytes:
    return _log.printable(text).encode("utf-8")


def _reason_name(name: str) -> str:
    """Where a rejected bundle's reason goes: NAME.reason, or for a name too long to
    take the suffix (or its temp name) a short one with a digest of the name."""
    shown = _shown(name)
    if len(shown.encode()) <= 160 and shown == name:
        return name + ".reason"
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f"{shown[:100]}-{digest}.reason"


@dataclass(frozen=True)
class _Candidate:
    """A ready bundle whose signature checked out: what the poll orders it by."""

    seq: int
    mtime: int
    path: Path
    st: os.stat_result
    digest: str
    rotates: bool  # carries a key rotation the host has not adopted
    resets: bool = False  # ... which resets the sequence (a leaked key's recovery)


@dataclass
class Watcher:
    """Polls inboxes and applies what arrives. ``poll`` is one cycle; ``run`` the loop."""

    host: Host
    inboxes: list[Path]
    settle: float = 5.0
    stop: threading.Event = field(default_factory=threading.Event)
    on_cycle: Callable[[list[Outcome]], None] | None = None
    _sightings: dict[Path, Sighting] = field(default_factory=dict)
    _deferred: dict[str, float] = field(default_factory=dict)

    # -- the ledger of bundles already dealt with ------------------------------------

    @property
    def _ledger_path(self) -> Path:
        return self.host.layout.state_dir / "watch" / "seen.json"

    def _seen(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._ledger_path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            logger.warning("%s is corrupt; starting a new one", self._ledger_path)
            return {}
        return data if isinstance(data, dict) else {}

    def _remember(self, key: str, outcome: Outcome) -> None:
        seen = self._seen()
        seen[key] = {**outcome.to_dict(), "time": int(time.time())}
        if len(seen) > MAX_SEEN:
            # Only files no longer there are forgotten (oldest first): forgetting one
            # that is would have it verified and recorded again at every poll. The
            # ledger is then as large as the inboxes hold, never more than MAX_SEEN
            # beyond that.
            gone = sorted((k for k in seen if _stale(k)), key=lambda k: seen[k].get("time", 0))
            for k in gone[:len(seen) - MAX_SEEN]:
                del seen[k]
        self._ledger_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _fs.atomic_write(self._ledger_path,
                         json.dumps(seen, sort_keys=True, indent=1).encode() + b"\n", 0o600)

    # -- one cycle -------------------------------------------------------------------

    def ready(self, now: float | None = None) -> list[tuple[Path, os.stat_result]]:
        """Bundle files whose copy is complete, not yet dealt with."""
        now = time.monotonic() if now is None else now
        seen = self._seen()
        out: list[tuple[Path, os.stat_result]] = []
        present: set[Path] = set()
        for inbox in self.inboxes:
            try:
                names = sorted(os.listdir(inbox))
            except FileNotFoundError:
                logger.debug("inbox %s is not there (stick not mounted?)", inbox)
                continue
            except OSError as e:
                logger.warning("cannot list inbox %s: %s", inbox, e.strerror)
                continue
            for name in names:
                if not is_bundle_name(name):
                    continue
                path = inbox / name
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not os.path.isfile(path):
                    continue
                present.add(path)
                key = _key(path, st.st_size, st.st_mtime_ns)
                if key in seen or self._deferred.get(key, 0.0) > now:
                    continue
                prev = self._sightings.get(path)
                if prev is None or (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    self._sightings[path] = Sighting(st.st_size, st.st_mtime_ns, now)
                    prev = self._sightings[path]
                    stable = self.settle <= 0  # "--settle 0": take it as it is
                else:
                    stable = now - prev.first_seen >= self.settle
                if stable or _exists(inbox / (name + DONE)):
                    out.append((path, st))
        for gone in set(self._sightings) - present:
            del self._sightings[gone]
        return out

    def poll(self) -> list[Outcome]:
        """Look once; apply the newest acceptable ready bundle. Never raises for a bundle.

        Bundles that rotate the host's keys go first, oldest first, whatever is newer:
        a newer bundle co-signed by old and new keys must not supersede the revocation,
        and one signed by the new keys alone is refused by the old trust, so what the
        old trust refused is looked at again once a rotation was adopted.
        """
        outcomes: list[Outcome] = []
        # A long-running watch sees config.yaml as it is now (a threshold raised, trust
        # rotated by a manual apply), and first finishes what a crash interrupted,
        # including a key rotation: a bundle 'already applied' is never looked at again.
        self.host.reload_config()
        self.host.recover_pending()
        refused: list[tuple[Path, os.stat_result, Exception]] = []
        candidates = self._candidates(self.ready(), refused)
        done: set[Path] = set()
        candidates, refused = self._rotations_first(candidates, refused, done, outcomes)
        outcomes += [self._failure(path, st, e) for path, st, e in refused]
        current = self.host.state.current()
        winner: str | None = None
        for c in sorted(candidates, key=lambda c: (c.seq, c.mtime), reverse=True):
            if self.stop.is_set():
                break
            if c.path in done:
                continue
            if c.resets:
                # Not adopted above (its apply was tried and failed, or we stop): never
                # recorded as 'not above' the sequence it exists to reset.
                continue
            if c.digest == current.manifest_sha256:
                outcomes.append(self._done(c.path, c.st, "skipped", "already applied"))
                continue
            if winner is not None or c.seq <= current.highest_sequence:
                why = (f"superseded by {winner}" if winner is not None else
                       f"sequence {c.seq} is not above {current.highest_sequence} already "
                       "applied")
                outcomes.append(self._done(c.path, c.st, "skipped", why))
                continue
            outcome = self._apply(c)
            outcomes.append(outcome)
            if outcome.result == "applied":
                winner = outcome.bundle_id
        if outcomes and self.on_cycle is not None:
            try:
                self.on_cycle(outcomes)
            except Exception:
                logger.exception("after-cycle hook failed")
        return outcomes

    def _rotations_first(self, candidates: list[_Candidate],
                         refused: list[tuple[Path, os.stat_result, Exception]],
                         done: set[Path], outcomes: list[Outcome],
                         ) -> tuple[list[_Candidate], list[tuple[Path, os.stat_result,
                                                                 Exception]]]:
        """Apply key rotations one at a time, oldest first: once one is in, everything
        not yet dealt with is peeked at again under the new trust (a second rotation
        may be signed by the first one's keys), until none is left to adopt. Returns
        the candidates and refusals as the trust now in force sees them."""
        while not self.stop.is_set():
            highest = self.host.state.current().highest_sequence
            rotations = sorted((c for c in candidates if c.rotates and c.path not in done
                                and (c.seq > highest or c.resets)),
                               key=lambda c: (c.seq, c.mtime))
            adopted = False
            for c in rotations:
                if self.stop.is_set():
                    break
                done.add(c.path)
                outcome = self._apply(c)
                outcomes.append(outcome)
                if outcome.result == "applied":
                    adopted = True
                    break
            if not adopted:
                break
            self.host.reload_config()
            again = [(c.path, c.st) for c in candidates if c.path not in done]
            again += [(path, st) for path, st, _ in refused]
            refused = []
            candidates = self._candidates(again, refused)
        return candidates, refused

    def _candidates(self, ready: list[tuple[Path, os.stat_result]],
                    refused: list[tuple[Path, os.stat_result, Exception]]) -> list[_Candidate]:
        """Peek at each ready bundle; what cannot be peeked at goes to ``refused``."""
        out: list[_Candidate] = []
        root = trust_store.load_root(self.host.layout, self.host.config)
        for path, st in ready:
            try:
                out.append(self._peek(path, st, root))
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the loop
                refused.append((path, st, e))
        return out

    def _apply(self, c: _Candidate) -> Outcome:
        try:
            report = self.host.apply(c.path)
        except Exception as e:  # noqa: BLE001 - keep running after any failure
            return self._failure(c.path, c.st, e)
        logger.info("applied %s from %s", report.bundle_id, _shown(c.path))
        return self._done(c.path, c.st, "applied", f"{len(report.plan.changes)} file(s) changed",
                          report.bundle_id)

    def _peek(self, path: Path, st: os.stat_result, root: TrustRoot) -> _Candidate:
        """The bundle's sequence and manifest digest, after its signature checked out,
        and whether it carries a key rotation not adopted yet."""
        with BundleFile(path) as bundle:
            manifest_bytes, sig = bundle.signed_part()
        current = self.host.state.current()
        verified = verify_manifest(manifest_bytes, sig, self.host.trust(),
                                   self.host.now(current), self.host.config.host)
        m = verified.manifest
        rotates = (m.trust is not None and m.sequence > root.sequence
                   and (m.trust.allowed_signers, m.trust.threshold)
                   != (root.allowed_signers, root.threshold))
        return _Candidate(m.sequence, st.st_mtime_ns, path, st, verified.manifest_sha256,
                          rotates, rotates and m.trust is not None and m.trust.reset_sequence)

    def _failure(self, path: Path, st: os.stat_result, e: Exception) -> Outcome:
        """``_settle_failure``, which never raises: a file whose name is too long, not
        UTF-8, or on a stick pulled out mid-read must not stop the other bundles."""
        try:
            return self._settle_failure(path, st, e)
        except Exception as inner:  # noqa: BLE001 - logged; the poll goes on
            logger.error("cannot record the outcome for %s: %s",  # noqa: TRY400 - one line
                         _shown(path), inner)
            self._deferred[_key(path, st.st_size, st.st_mtime_ns)] = (
                time.monotonic() + RETRY_AFTER)
            return Outcome(path, "deferred", f"{e}; and its outcome could not be recorded: "
                                             f"{inner}")

    def _settle_failure(self, path: Path, st: os.stat_result, e: Exception) -> Outcome:
        try:
            after = os.stat(path)
        except FileNotFoundError:
            return Outcome(path, "deferred", "vanished while being read")
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            # Still being written after all (a copy that paused): wait for it.
            self._sightings.pop(path, None)
            return Outcome(path, "deferred", "changed while being read")
        reason = str(e) if isinstance(e, ApplierError) else f"internal error: {e!r}"
        if isinstance(e, (HostNotInBundleError, ReplayError)):
            logger.info("skipping %s: %s", path, reason)
            return self._done(path, st, "skipped", reason)
        if isinstance(e, (LockedError, HostIOError, HostConfigError, StateError)) or not \
                isinstance(e, ApplierError):
            if not isinstance(e, ApplierError):
                logger.error("internal error on %s", path, exc_info=e)
            logger.warning("deferring %s: %s", path, reason)
            self._deferred[_key(path, st.st_size, st.st_mtime_ns)] = (
                time.monotonic() + RETRY_AFTER)
            self._sightings.pop(path, None)
            return Outcome(path, "deferred", reason)
        logger.error("rejected %s: %s", path, reason)
        where = self._move_aside(path, reason)
        return self._done(path, st, "rejected", f"{reason} ({where})")

    def _done(self, path: Path, st: os.stat_result, result: Result, reason: str,
              bundle_id: str | None = None) -> Outcome:
        outcome = Outcome(path, result, reason, bundle_id)
        self._remember(_key(path, st.st_size, st.st_mtime_ns), outcome)
        self._sightings.pop(path, None)
        return outcome

    def _move_aside(self, path: Path, reason: str) -> str:
        """Move a rejected bundle into INBOX/rejected/ with its reason; if the inbox is
        read-only (or rejected/ is anything but a real directory), leave it and write
        the reason under the state dir."""
        aside = path.parent / REJECTED
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = _utf8(f"{stamp} {self.host.config.host}: {reason}\n")
        note = _reason_name(path.name)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(aside, 0o755)
            # Never through a symlink (a writable inbox could point rejected/ anywhere,
            # and this runs as root): the directory is opened without following one,
            # and the reason and the bundle go into that very directory.
            fd = os.open(aside, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _fs.atomic_write(note, text, 0o644, dir_fd=fd)
                os.replace(path, path.name, dst_dir_fd=fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fs.remove_quietly(path.parent / (path.name + DONE))
            _fs.fsync_dir(path.parent)
        except (OSError, HostIOError) as e:
            err = getattr(e, "errno", None) or getattr(e.__cause__, "errno", None)
            if err not in (errno.EROFS, errno.EACCES, errno.EPERM, None):
                logger.warning("cannot move %s aside: %s", _shown(path), e)
            state_aside = self.host.layout.state_dir / "watch" / REJECTED
            state_aside.mkdir(parents=True, exist_ok=True, mode=0o700)
            _fs.atomic_write(state_aside / note,
                             text + _utf8(f"file left in place: {_shown(path)}\n"), 0o600)
            return f"inbox not writable; reason in {_shown(state_aside / note)}"
        return f"moved to {_shown(aside / path.name)}"

    # -- the loop --------------------------------------------------------------------

    def run(self, interval: float = 5.0, once: bool = False) -> list[Outcome]:
        """Poll every ``interval`` seconds until ``stop`` is set; with ``once``, take what
        is there (waiting ``settle`` for copies to finish) and return."""
        outcomes: list[Outcome] = []
        if once:
            deadline = time.monotonic() + self.settle
            while True:
                outcomes += self.poll()
                pending = [p for p in self._sightings if p.exists()]
                if not pending or time.monotonic() >= deadline + self.settle or \
                        self.stop.is_set():
                    return outcomes
                self.stop.wait(min(interval, max(0.05, self.settle / 4)))
        logger.info("watching %s every %ss", ", ".join(map(str, self.inboxes)), interval)
        while not self.stop.is_set():
            try:
                outcomes += self.poll()
            except Exception:
                # The inbox vanished mid-poll, state unreadable...: log, wait, go on.
                logger.exception("watch cycle failed")
            self.stop.wait(interval)
        logger.info("watch stopped")
        return outcomes
