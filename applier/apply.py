"""The host's operations: init, verify, apply, rollback, recover, status, history.

This is where the pieces meet, in the order DESIGN.md fixes: lock -> recover any
unfinished transaction -> verify (signature, then every member while it streams into
private staging) -> policy -> plan -> transaction (prepare, validate, swap, check,
on_change, health) -> commit (retain the bundle, ``current.json``) -> prune -> audit.
Any failure before the swap leaves the host as it was; any failure after it rolls
the transaction back. Not for: printing (cli.py) or the format (bundle.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from applier import _fs, commands, policy, trust_store
from applier.bundle import PAYLOAD_NOT_NEEDED, BlobSink, SinkFactory, read_bundle
from applier.config import HostConfig, write_config
from applier.errors import (
    ApplierError,
    CommandError,
    HealthCheckError,
    HostConfigError,
    HostIOError,
    LockedError,
    NoRollbackTargetError,
    StateError,
    ValidationFailedError,
)
from applier.lock import locked
from applier.manifest import BLOB_PREFIX, Command, HostEntry, Manifest
from applier.paths import HostLayout, resolve_target
from applier.plan import CommandKind, Plan, accounts_cached, make_plan
from applier.sshsig import AllowedSigners, VerifiedSigner
from applier.state import Current, Retained, State
from applier.transaction import Transaction, new_txid, pending, recover
from applier.trust import Rotation, check_rotation, replay_floor
from applier.verify import TrustPolicy, VerifiedManifest, verify_manifest

logger = logging.getLogger(__name__)


@dataclass
class Report:
    """What an operation did (or, with dry_run, would do); the CLI prints it."""

    action: str
    bundle_id: str | None
    plan: Plan
    dry_run: bool = False
    noop: bool = False
    # False when the bundle is the current one and every file's content is already in
    # the content store: its payload could change nothing, so it was not read.
    payload_read: bool = True
    commands: list[commands.CommandResult] = field(default_factory=list)
    signers: list[str] = field(default_factory=list)
    recovered: dict[str, Any] | None = None
    # The saved set (drift.py) holding what the plan replaced or removed that the
    # current bundle had not put there, if anything.
    saved: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "bundle_id": self.bundle_id, "dry_run": self.dry_run,
                "plan": self.plan.to_dict(), "signers": self.signers,
                "payload_read": self.payload_read,
                "commands": [c.to_dict() for c in self.commands],
                "recovered": self.recovered, "saved": self.saved}


class _StagingSink:
    """Writes one verified-as-it-streams blob into a private staging file.

    Every OSError (the disk filling up part-way: at open, write or the final flush)
    becomes a HostIOError saying how much the bundle needs, so the bundle reader does
    not report it as a problem with the bundle.
    """

    def __init__(self, path: Path, need: int) -> None:
        self.path = path
        self.need = need
        try:
            self._f = _fs.open_exclusive(path, 0o600)
        except OSError as e:
            raise self._error(e) from e

    def _error(self, e: OSError) -> HostIOError:
        return _fs.io_error(e, f"cannot stage the bundle's new content in {self.path.parent} "
                               f"(it needs {self.need} bytes)")

    def write(self, chunk: bytes) -> None:
        try:
            self._f.write(chunk)
        except OSError as e:
            raise self._error(e) from e

    def commit(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            _fs.remove_quietly(self.path)
            raise self._error(e) from e

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the flush of a doomed file may fail too
            self._f.close()
        _fs.remove_quietly(self.path)


def init_host(root: Path, host: str, allowed_signers: Path, force: bool = False,
              threshold: int = 1, retain: int = 5) -> HostConfig:
    """Write the host's config and copy its trust file under the root."""
    layout = HostLayout(root)
    if layout.config_file.exists() and not force:
        raise HostConfigError(f"{layout.config_file}: host already initialised "
                              "(use --force to overwrite)")
    try:
        text = allowed_signers.read_text(encoding="utf-8")
    except OSError as e:
        raise HostConfigError(f"{allowed_signers}: cannot read: {e.strerror}") from e
    signers = AllowedSigners.from_text(text, str(allowed_signers))
    if len(signers.entries) < threshold:
        raise HostConfigError(f"{allowed_signers}: {len(signers.entries)} signer(s) cannot "
                              f"meet a threshold of {threshold}")
    config = HostConfig(host=host, threshold=threshold, retain=retain)
    layout.config_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    _fs.atomic_write(layout.config_dir / config.allowed_signers, text.encode(), 0o644)
    State(layout).ensure()
    write_config(config, layout.config_file, layout.config_cache)
    return config


class Host:
    """One host under one root: its config, trust, state and operations."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time,
                 lock_wait: float = 0.0) -> None:
        self.layout = HostLayout(root)
        self.clock = clock
        self.state = State(self.layout, clock)
        self.lock_wait = lock_wait
        self._config: HostConfig | None = None
        self._config_digest: str | None = None  # parsed from YAML, not yet in the cache

    # -- configuration ----------------------------------------------------------------

    @property
    def config(self) -> HostConfig:
        if self._config is None:
            self._config, self._config_digest = HostConfig.load_cached(
                self.layout.config_file, self.layout.config_cache)
        return self._config

    def trust(self) -> TrustPolicy:
        path = self.layout.config_dir / self.config.allowed_signers
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise HostConfigError(f"{path}: cannot read trusted signers: {e.strerror}") from e
        return TrustPolicy(AllowedSigners.from_text(text, str(path)), self.config.threshold)

    def now(self, current: Current) -> int:
        return policy.effective_now(int(self.clock()), current)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        # The config first: on a host never initialised (or with a broken config.yaml)
        # a command says so and creates nothing, not even the lock file.
        _ = self.config
        with locked(self.layout, self.lock_wait), accounts_cached():
            yield
            # A config.yaml parsed by an operation that succeeded under the lock is
            # cached for the next command. Not by a read-only command (status, verify),
            # nor by a refused apply: they change nothing on disk.
            if self._config is not None and self._config_digest is not None:
                self._config.store_cache(self.layout.config_cache, self._config_digest)
                self._config_digest = None

    def _values(self) -> dict[str, str]:
        return {"root": self.layout.root_arg}

    def _env(self, bundle_id: str | None) -> dict[str, str]:
        return {"GITOPS_ROOT": self.layout.root_arg or "/", "GITOPS_HOST": self.config.host,
                "GITOPS_BUNDLE": bundle_id or ""}

    def _run_all(self, cmds: list[Command], bundle_id: str | None = None,
                 ) -> list[commands.CommandResult]:
        return [commands.run(c, self._values(), self._env(bundle_id)) for c in cmds]

    # -- recovery ---------------------------------------------------------------------

    def recover(self) -> dict[str, Any] | None:
        """Finish (roll back or forward) an interrupted transaction; audit what was done;
        then adopt a key rotation that a crash kept from being adopted."""
        done = recover(self.layout, self.state.current().txid, self._run_all)
        if done is not None:
            self.state.audit("recover", **done)
        self.finish_trust()
        return done

    # -- verify -----------------------------------------------------------------------

    def recover_pending(self) -> dict[str, Any] | None:
        """The first step of every command: finish an interrupted transaction, if any.

        A journal whose lock is held belongs to a live apply, not a dead one: skip it.
        """
        if not pending(self.layout) and self._trust_unadopted() is None:
            return None
        try:
            with locked(self.layout, 0.0):
                return self.recover()
        except LockedError:
            return None

    def verify(self, bundle: Path) -> VerifiedManifest:
        """Everything apply checks before it changes anything, changing nothing."""
        self.recover_pending()
        current = self.state.current()
        now = self.now(current)

        def on_manifest(verified: VerifiedManifest) -> None:
            rotation = check_rotation(verified, trust_store.load_root(self.layout, self.config),
                                      now)
            floor = replay_floor(current, rotation)
            self._check_policy(verified, floor, self.now(floor), force=False)

        return read_bundle(bundle, self.trust(), now, on_manifest=on_manifest,
                           host=self.config.host, known=self._known(current)).verified

    def _known(self, current: Current) -> Callable[[str], Manifest | None]:
        """The view of the current bundle kept in state, to re-apply it without a parse."""
        return lambda digest: self.state.known_view(current, digest, self.config.host)

    def _check_policy(self, verified: VerifiedManifest, current: Current, now: int,
                      force: bool) -> HostEntry:
        m = verified.manifest
        digest = verified.manifest_sha256
        entry = policy.host_entry(m, self.config)
        policy.check_replay(m, digest, current)
        policy.check_expiry(m, now, self.config.clock_skew)
        policy.check_not_bad(digest, self.state.bad_bundles(), force)
        policy.check_modes(entry, self.config)
        dirs: dict[str, str] = {}
        for f in entry.files:
            resolve_target(self.layout, f.path, self.config.allowed_prefixes, dirs)
        return entry

    # -- apply ------------------------------------------------------------------------

    def apply(self, bundle: Path, dry_run: bool = False, force: bool = False) -> Report:
        with self.locked():
            recovered = self.recover()
            current = self.state.current()
            now = self.now(current)
            trust = self.trust()
            self.state.ensure()
            staging = self.layout.staging / new_txid()
            chosen: dict[str, HostEntry] = {}
            rotations: list[Rotation] = []  # a key rotation to adopt once applied (trust.py)

            def on_manifest(verified: VerifiedManifest) -> SinkFactory:
                nonlocal current
                before = current
                rotation = check_rotation(
                    verified, trust_store.load_root(self.layout, self.config), now)
                rotations.extend([rotation] if rotation is not None else [])
                current = replay_floor(current, rotation)
                entry = self._check_policy(verified, current, self.now(current), force)
                chosen["entry"] = entry
                needed = {f.sha256 for f in entry.files if not self.state.has_object(f.sha256)}
                if not needed and verified.manifest_sha256 == before.manifest_sha256:
                    # The bundle applied now, with every content in the store (verified
                    # when it was adopted, re-hashed when copied out): the payload can
                    # change nothing, so a 1.7 GB bundle is not read again to re-apply.
                    return PAYLOAD_NOT_NEEDED
                staging.mkdir(mode=0o700)
                # Once per blob: a file shared by many paths is staged once.
                need = sum({f.sha256: f.size for f in entry.files if f.sha256 in needed}.values())
                _check_space(staging, need)

                def sink(name: str, digest: str, size: int) -> BlobSink | None:
                    del size
                    if name.startswith(BLOB_PREFIX) and digest in needed:
                        return _StagingSink(staging / digest, need)
                    return None
                return sink

            try:
                result = read_bundle(bundle, trust, now, on_manifest=on_manifest,
                                     host=self.config.host, known=self._known(current))
                verified = result.verified
                report = self._transact(verified, chosen["entry"],
                                        staging if result.payload_read else None, "apply",
                                        dry_run, current, payload_read=result.payload_read,
                                        trust_pending=bool(rotations))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if rotations and not dry_run:
                # After the commit point: a crash (or a full disk) between the two is
                # finished by the next command (finish_trust), never lost.
                self._config = trust_store.adopt(self.layout, self.config, self.state,
                                                 rotations[0])
                self._config_digest = None  # adopt wrote config.yaml and its cache
            report.recovered = recovered
            return report

    def reload_config(self) -> None:
        """Read config.yaml again at its next use (a long-running watch: an operator may
        have raised the threshold, or a manual apply adopted a key rotation)."""
        self._config = None
        self._config_digest = None

    def _trust_unadopted(self) -> Current | None:
        """The current state if its bundle's key rotation is still to be adopted."""
        current = self.state.current()
        if (current.trust_pending and current.bundle_id is not None
                and self.config.trust_sequence < current.sequence):
            return current
        return None

    def finish_trust(self) -> None:
        """Adopt the key rotation of the current bundle if a crash came between its
        commit and the adoption (a revocation must not be lost). Under the lock."""
        current = self._trust_unadopted()
        if current is None or current.bundle_id is None:
            return
        # Its signatures are checked again, against the trust still in force (the old
        # keys signed it, or it would not have been applied), then the rotation's, as
        # of when it was applied: a rotation is often made because an old key is about
        # to expire, and the host may only come back after it has.
        when = current.applied_at
        try:
            retained = self.state.get_retained(current.bundle_id)
            verified = verify_manifest(retained.manifest_bytes, retained.signature_bytes,
                                       self.trust(), when, self.config.host)
            rotation = check_rotation(
                verified, trust_store.load_root(self.layout, self.config), when)
            if rotation is not None:
                logger.warning("adopting the key rotation of bundle %s, interrupted after "
                               "it was applied", current.bundle_id)
                self._config = trust_store.adopt(self.layout, self.config, self.state,
                                                 rotation)
                self._config_digest = None
        except ApplierError as e:
            # Never a reason to refuse every command from now on: say it, every time.
            logger.error("cannot adopt the key rotation of the current bundle %s: %s",  # noqa: TRY400
                         current.bundle_id, e)

    def _content(self, staging: Path | None) -> Callable[[str], Path]:
        def content(sha: str) -> Path:
            if staging is not None and (staging / sha).is_file():
                return staging / sha
            return self.state.object_path(sha)
        return content

    def _old_entry(self, current: Current) -> HostEntry | None:
        if current.bundle_id is None:
            return None
        try:
            return self.state.get_retained(current.bundle_id).host_entry(self.config.host)
        except StateError:
            logger.warning("current bundle %s is not retained; files it managed and the "
                           "new bundle drops cannot be removed", current.bundle_id)
            return None

    def _transact(self, verified: VerifiedManifest, entry: HostEntry, staging: Path | None,
                  purpose: str, dry_run: bool, current: Current, *,
                  plan: Plan | None = None, audit: dict[str, Any] | None = None,
                  payload_read: bool = True, trust_pending: bool = False) -> Report:
        # ``plan`` and ``audit``: drift repair (drift.py) passes a plan of just the
        # drifted files and who/what to record, and otherwise goes the same way.
        m = verified.manifest
        digest = verified.manifest_sha256
        if plan is None:
            plan = make_plan(self.layout, entry, self._old_entry(current),
                             self.config.allowed_prefixes)
        signers = [describe_signer(s) for s in verified.signers]
        report = Report(purpose, m.bundle_id, plan, dry_run=dry_run, signers=signers,
                        noop=plan.empty and current.manifest_sha256 == digest,
                        payload_read=payload_read)
        if not payload_read:
            audit = {**(audit or {}), "payload_read": False}
        if dry_run:
            return report
        if any(c.save for c in plan.changes):
            # Nothing lost: a file the tool never managed (a package's nginx.conf taken
            # over by the first apply) or one changed out of band is copied aside
            # before it is replaced or removed, as a repair does (drift --history).
            from applier import drift  # noqa: PLC0415 - on demand (test_startup.py)

            keep = drift.displaced(plan)
            who = drift.invoker()
            report.saved = drift.save(self.layout, keep, current.bundle_id, who,
                                      int(self.clock()), purpose).id
            audit = {**(audit or {}), "saved": report.saved, "by": who}
        tx = Transaction(self.layout, plan, self._content(staging), purpose, m.bundle_id)

        def rerun(cmds: list[Command]) -> list[commands.CommandResult]:
            return self._run_all(cmds, current.bundle_id)

        try:
            if not plan.empty:
                self._swap(tx, plan, report)
            # Re-applying the current bundle to a host that matches it writes nothing
            # but its audit record: no new commit point, no retention work.
            if not report.noop:
                self._commit(verified, staging, current, tx.txid, digest, trust_pending)
            elif staging is not None and staging.is_dir():
                # A content the store had lost came back with the bundle: keep it for
                # rollback and drift repair, even though nothing else changes.
                self.state.adopt_objects(sorted(staging.iterdir()))
        except (ValidationFailedError, CommandError, HealthCheckError) as e:
            # Remembered first: a crash during the rollback must not let watch retry it.
            # But only remembered if the disk lets us: the rollback must run whatever
            # happens here, and the failure is what the operator needs to hear about.
            reason = str(e)
            if purpose == "apply":
                self._best_effort(lambda: self.state.mark_bad(digest, reason),
                                  "remember the bundle as failed")
            report.commands += tx.rollback(rerun)
            self._best_effort(lambda: self._audit(purpose, m, verified, plan, report,
                                                  f"failed: {reason}", audit),
                              "record the failure in the audit log")
            raise
        except BaseException:
            # Anything else (disk full, a bug, Ctrl-C): the journal says what to undo, and
            # current.json whether the commit point was passed (then it rolls forward).
            if self.layout.journal.exists():
                recover(self.layout, self.state.current().txid, rerun)
            raise
        if not plan.empty:
            tx.finish()
        if not report.noop:
            self.state.clear_bad(digest)
            self.state.prune(self.config.retain, m.bundle_id)
        self._audit(purpose, m, verified, plan, report, "ok", audit)
        return report

    @staticmethod
    def _best_effort(step: Callable[[], object], what: str) -> None:
        """Run a bookkeeping step of a failed apply; a full disk only gets a warning."""
        try:
            step()
        except HostIOError as e:
            logger.warning("could not %s: %s", what, e)

    def _swap(self, tx: Transaction, plan: Plan, report: Report) -> None:
        bundle_id = tx.journal.new_bundle
        tx.prepare()
        for op, change in zip(tx.journal.ops, plan.changes, strict=True):
            if change.new is None or op.temp is None:
                continue
            for cmd in change.new.validate:
                r = commands.run(cmd, {**self._values(), "path": op.temp}, self._env(bundle_id))
                report.commands.append(r)
                if not r.ok:
                    raise ValidationFailedError(
                        f"{change.path}: validate '{cmd.run}' failed ({r.reason}); "
                        "nothing changed")
        tx.swap()
        self._run_phase(plan, "check", bundle_id, report, lambda cmd, r: ValidationFailedError(
            f"check '{cmd.run}' failed ({r.reason}); old files restored before any reload"))
        tx.services_phase()
        self._run_phase(plan, "on_change", bundle_id, report, lambda cmd, r: CommandError(
            f"on_change '{cmd.run}' failed ({r.reason}); rolled back"))
        self._run_phase(plan, "health", bundle_id, report, lambda cmd, r: HealthCheckError(
            f"health check '{cmd.run}' failed after {r.attempts} attempt(s) ({r.reason}); "
            "rolled back"), retry=True)

    def _run_phase(self, plan: Plan, kind: CommandKind, bundle_id: str | None, report: Report,
                   failure: Callable[[Command, commands.CommandResult], ApplierError],
                   retry: bool = False) -> None:
        """Run each of the plan's ``kind`` commands once; the first failure raises."""
        for cmd in plan.commands(kind):
            r = commands.run(cmd, self._values(), self._env(bundle_id), retry=retry)
            report.commands.append(r)
            if not r.ok:
                raise failure(cmd, r)

    def _commit(self, verified: VerifiedManifest, staging: Path | None, current: Current,
                txid: str, digest: str, trust_pending: bool = False) -> None:
        m = verified.manifest
        self.state.retain(verified, self.config.host)
        if staging is not None and staging.is_dir():
            self.state.adopt_objects(sorted(staging.iterdir()))
        self.state.write_current(Current(
            bundle_id=m.bundle_id, sequence=m.sequence, commit=m.source.commit,
            applied_at=int(self.clock()),
            highest_sequence=max(current.highest_sequence, m.sequence),
            newest_created=max(current.newest_created, m.created),
            manifest_sha256=digest, txid=txid, trust_pending=trust_pending,
        ))

    def _audit(self, purpose: str, m: Manifest, verified: VerifiedManifest, plan: Plan,
               report: Report, result: str, extra: dict[str, Any] | None = None) -> None:
        self.state.audit(
            purpose, bundle_id=m.bundle_id, sequence=m.sequence, commit=m.source.commit,
            subject=m.source.subject, author=m.source.author,
            signers=[describe_signer(s) for s in verified.signers], host=self.config.host,
            added=[c.path for c in plan.by_kind("add")],
            updated=[c.path for c in plan.by_kind("update")],
            removed=[c.path for c in plan.by_kind("remove")],
            commands=[c.to_dict() for c in report.commands], result=result,
            **(extra or {}),
        )

    # -- rollback ---------------------------------------------------------------------

    def rollback(self, to: str | None = None, dry_run: bool = False) -> Report:
        with self.locked():
            recovered = self.recover()
            current = self.state.current()
            if to is not None:
                target = self.state.get_retained(to)
            else:
                older = [(r.sequence if r.sequence is not None else r.manifest.sequence, r)
                         for r in self.state.retained() if r.bundle_id != current.bundle_id]
                older = [(seq, r) for seq, r in older if seq < current.sequence]
                if not older:
                    raise NoRollbackTargetError("no retained bundle older than the current one")
                target = max(older, key=lambda t: t[0])[1]
            # Re-verify against today's trust: a revoked key's bundle is not a way back.
            verified = verify_manifest(target.manifest_bytes, target.signature_bytes,
                                       self.trust(), self.now(current), self.config.host)
            entry = policy.host_entry(verified.manifest, self.config)
            missing = [f.path for f in entry.files if not self.state.has_object(f.sha256)]
            if missing:
                raise StateError(f"retained bundle {target.bundle_id} lacks content for "
                                 f"{missing[0]}")
            report = self._transact(verified, entry, None, "rollback", dry_run, current)
            report.recovered = recovered
            return report

    # -- read-only views ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        self.recover_pending()
        current = self.state.current()
        retained = self.state.retained()
        records = self.state.audit_records()
        last = next((r for r in reversed(records) if r["event"] in ("apply", "rollback")),
                    None)
        out: dict[str, Any] = {
            "host": self.config.host,
            "root": str(self.layout.root),
            "current": None,
            "highest_sequence": current.highest_sequence,
            "retained": [_retained_summary(r) for r in retained],
            "last_result": None if last is None else {
                "event": last["event"], "time": last["time"], "bundle_id": last["bundle_id"],
                "result": last["result"]},
            "transaction_pending": self.layout.journal.exists(),
        }
        if current.bundle_id is not None:
            out["current"] = {"bundle_id": current.bundle_id, "sequence": current.sequence,
                              "commit": current.commit, "applied_at": current.applied_at}
        return out

    def history(self) -> list[dict[str, Any]]:
        self.recover_pending()
        return self.state.audit_records()


def _check_space(directory: Path, needed: int) -> None:
    """Refuse before staging when the state filesystem cannot hold the new content."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise HostIOError(f"{directory}: not enough space to stage the bundle: need "
                          f"{needed} bytes, {free} free")


def _retained_summary(r: Retained) -> dict[str, Any]:
    if r.sequence is None or r.commit is None:  # retained before meta.json carried them
        m = r.manifest
        return {"bundle_id": r.bundle_id, "sequence": m.sequence, "commit": m.source.commit,
                "applied_at": r.applied_at}
    return {"bundle_id": r.bundle_id, "sequence": r.sequence, "commit": r.commit,
            "applied_at": r.applied_at}


def describe_signer(signer: VerifiedSigner) -> str:
    return f"{','.join(signer.principals)} ({signer.fingerprint})"
