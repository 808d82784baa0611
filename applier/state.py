"""The state directory: current bundle, retained bundles, content store, audit log.

Layout (under ``<root>/var/lib/gitops-apply``)::

    current.json          the commit point: current bundle id, its sequence, the
                          highest sequence and newest creation time ever accepted
    bundles/<id>/         a retained bundle: its exact manifest.json and .sig bytes
                          and meta.json (when it was applied)
    objects/<ab>/<sha>    content store: this host's file contents, by SHA-256,
                          shared by every retained bundle (rollback and drift repair
                          read from here)
    staging/<txid>/       blobs streamed out of a bundle being verified
    journal.json          the in-flight transaction (see transaction.py)
    audit.log             append-only JSON lines, one per event
    bad.json              bundles that failed checks/health, never retried unasked

Every write goes through ``_fs.atomic_write``. Not for: the transaction itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from applier import _faults, _fs
from applier.errors import ManifestError, StateError
from applier.manifest import FileEntry, HostEntry, Manifest, canonical_json
from applier.paths import HostLayout

if TYPE_CHECKING:
    from applier.verify import VerifiedManifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Current:
    """The contents of current.json. Writing it commits a transaction."""

    bundle_id: str | None
    sequence: int
    commit: str | None
    applied_at: int
    highest_sequence: int
    newest_created: int
    manifest_sha256: str | None = None
    txid: str | None = None  # the transaction this commit closed (recovery compares it)
    # The bundle carries a key rotation, adopted just after this commit: if a crash
    # came first, the next command adopts it (Host.finish_trust) while the config's
    # trust_sequence is still below this bundle's sequence.
    trust_pending: bool = False

    @classmethod
    def empty(cls) -> Current:
        return cls(None, 0, None, 0, 0, 0)


@dataclass(frozen=True)
class Retained:
    """A retained bundle. The signed bytes are read only when asked for: a fleet
    manifest is tens of MB, and listing bundles or finding this host's files must not
    parse it (``host.json`` is this host's part, written from the verified manifest)."""

    bundle_id: str
    directory: Path
    applied_at: int
    sequence: int | None = None
    commit: str | None = None
    # Its place in the order bundles were applied: a counter, not a clock, so a clock
    # set back (an RTC reset) cannot make prune drop the bundle applied just before the
    # current one. 0 for bundles retained before the counter existed (oldest first).
    order: int = 0

    @property
    def manifest_bytes(self) -> bytes:
        return (self.directory / "manifest.json").read_bytes()

    @property
    def signature_bytes(self) -> bytes:
        return (self.directory / "manifest.json.sig").read_bytes()

    @property
    def manifest(self) -> Manifest:
        return Manifest.from_bytes(self.manifest_bytes)

    def host_entry(self, host: str) -> HostEntry | None:
        """This host's files in the bundle, from host.json when it was written."""
        try:
            entry = _host_part(self.directory, host)
        except FileNotFoundError:
            entry = None
        except ValueError as e:
            raise StateError(f"{self.directory}/host.json: corrupt state file: {e}") from e
        if entry is None:  # retained before host.json existed, or for another host
            return Manifest.from_bytes(self.manifest_bytes, host).hosts.get(host)
        return entry

    def content_digests(self) -> set[str]:
        """Every blob this retained bundle may need from the content store."""
        try:
            data = json.loads((self.directory / "host.json").read_bytes())
            return {f["sha256"] for f in data["files"]}
        except (FileNotFoundError, ValueError, KeyError):
            return {f.sha256 for h in self.manifest.hosts.values() for f in h.files}


def _host_part(directory: Path, host: str) -> HostEntry | None:
    """The host.json of a retained bundle, if it holds ``host``'s files (None if it
    holds another host's). Raises OSError (FileNotFoundError when it was never
    written) and ValueError/KeyError/TypeError/ManifestError for a damaged one."""
    data = json.loads((directory / "host.json").read_bytes())
    if data.get("host") != host:
        return None
    return HostEntry(tuple(FileEntry.from_dict(f, f"{directory}/host.json")
                           for f in data["files"]))


class State:
    """Read and write the host's state directory."""

    def __init__(self, layout: HostLayout, clock: Callable[[], float] = time.time) -> None:
        self.layout = layout
        self.clock = clock  # the host's (Host.clock), so tests can set it back

    def ensure(self) -> None:
        for d in (self.layout.state_dir, self.layout.bundles, self.layout.objects,
                  self.layout.staging):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.layout.lock.touch(mode=0o600, exist_ok=True)

    # -- current ---------------------------------------------------------------------

    def current(self) -> Current:
        try:
            data = json.loads(self.layout.current.read_bytes())
            return Current(**data)
        except FileNotFoundError:
            return Current.empty()
        except (ValueError, TypeError) as e:
            raise StateError(f"{self.layout.current}: corrupt state file: {e}") from e

    def write_current(self, current: Current) -> None:
        _fs.atomic_write(self.layout.current, _dumps(asdict(current)), 0o600, fault="current")

    # -- retained bundles ------------------------------------------------------------

    def retain(self, verified: VerifiedManifest, host: str) -> None:
        manifest = verified.manifest
        d = self.layout.bundles / manifest.bundle_id
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            _fs.fsync_dir(self.layout.bundles)  # its entry too, not only what is in it
        _fs.atomic_write(d / "manifest.json", verified.manifest_bytes, 0o600,
                         fault="retain-manifest")
        _fs.atomic_write(d / "manifest.json.sig", verified.signature_bytes, 0o600,
                         fault="retain-sig")
        entry = manifest.hosts.get(host)
        if entry is not None:
            part = {"host": host, "files": [f.to_dict() for f in entry.files]}
            _fs.atomic_write(d / "host.json", canonical_json(part), 0o600, fault="retain-host")
        view = {"manifest_sha256": verified.manifest_sha256, "host": host,
                **manifest.view_rest()}
        _fs.atomic_write(d / "view.json", canonical_json(view), 0o600, fault="retain-view")
        order = max((r.order for r in self.retained()), default=0) + 1
        now = self.clock()
        meta = {"applied_at": int(now), "applied_ns": int(now * 1e9), "order": order,
                "sequence": manifest.sequence, "commit": manifest.source.commit}
        # meta.json last: a retained bundle without it is incomplete and ignored.
        _fs.atomic_write(d / "meta.json", _dumps(meta), 0o600, fault="retain-meta")

    def known_view(self, current: Current, digest: str, host: str) -> Manifest | None:
        """This host's view of the current bundle's manifest, if ``digest`` is its SHA-256.

        Rebuilt (and re-checked) from view.json and host.json, which were written from
        the view parsed when those exact bytes were verified; None when they are missing
        or unreadable, and the caller parses the signed bytes instead.
        """
        if current.bundle_id is None or current.manifest_sha256 != digest:
            return None
        d = self.layout.bundles / current.bundle_id
        try:
            rest = json.loads((d / "view.json").read_bytes())
            if rest.pop("manifest_sha256") != digest or rest.pop("host") != host:
                return None
            entry = _host_part(d, host) if host in rest["host_names"] else None
            return Manifest.from_view(rest, host, entry)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ManifestError) as e:
            # The signed bytes are the authority: parse them.
            logger.debug("%s: no usable view of the current bundle (%s); parsing it", d, e)
            return None

    def retained(self) -> list[Retained]:
        """Every retained bundle, oldest applied first (by ``order``, then the clock)."""
        out: list[tuple[tuple[int, int], Retained]] = []
        if not self.layout.bundles.is_dir():
            return []
        for d in self.layout.bundles.iterdir():
            try:
                meta = json.loads((d / "meta.json").read_bytes())
                if not (d / "manifest.json").is_file() or not (d / "manifest.json.sig").is_file():
                    raise FileNotFoundError(d)
                out.append(((int(meta.get("order", 0)), int(meta.get("applied_ns", 0))),
                            Retained(d.name, d, int(meta["applied_at"]), meta.get("sequence"),
                                     meta.get("commit"), int(meta.get("order", 0)))))
            except (OSError, ValueError, KeyError, TypeError):
                # A half-written retained bundle (crash before commit) is not one.
                logger.debug("ignoring incomplete retained bundle %s", d.name)
        return [r for _, r in sorted(out, key=lambda t: t[0])]

    def get_retained(self, bundle_id: str) -> Retained:
        for r in self.retained():
            if r.bundle_id == bundle_id:
                return r
        matches = [r for r in self.retained() if r.bundle_id.startswith(bundle_id)
                   or r.bundle_id.split("-", 1)[-1].startswith(bundle_id)]
        if len(matches) == 1:
            return matches[0]
        raise StateError(f"no retained bundle {bundle_id!r}" if not matches
                         else f"bundle id {bundle_id!r} is ambiguous")

    def prune(self, keep: int, current_id: str | None) -> list[str]:
        """Keep the ``keep`` most recently applied bundles; drop unreferenced objects."""
        retained = self.retained()
        drop = [r for r in retained[:-keep] if r.bundle_id != current_id] if keep else []
        for r in drop:
            shutil.rmtree(self.layout.bundles / r.bundle_id, ignore_errors=True)
        if drop:
            self.gc_objects()
        return [r.bundle_id for r in drop]

    def referenced_objects(self) -> set[str]:
        refs: set[str] = set()
        for r in self.retained():
            refs |= r.content_digests()
        return refs

    def gc_objects(self) -> None:
        refs = self.referenced_objects()
        for sha, path in self.iter_objects():
            if sha not in refs:
                _fs.remove_quietly(path)

    # -- content store ---------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        return self.layout.objects / sha256[:2] / sha256

    def has_object(self, sha256: str) -> bool:
        return self.object_path(sha256).is_file()

    def iter_objects(self) -> Iterator[tuple[str, Path]]:
        if not self.layout.objects.is_dir():
            return
        for sub in self.layout.objects.iterdir():
            for p in sub.iterdir():
                yield p.name, p

    def adopt_objects(self, staged: Iterable[Path]) -> None:
        """Move verified staged blobs into the content store (same filesystem: rename).

        The store is what rollback and drift repair read later, so its files and
        entries must be durable before the commit point: for many files one sync(2)
        beats an fsync of each file and of up to 256 fan-out directories.
        """
        moved: list[Path] = []
        new_dirs = False
        for src in staged:
            dst = self.object_path(src.name)
            if not dst.parent.is_dir():
                dst.parent.mkdir(exist_ok=True, mode=0o700)
                new_dirs = True
            os.replace(src, dst)
            _faults.point("adopt-object")
            moved.append(dst)
        if _fs.make_durable(moved, threshold=16):
            return
        for d in {p.parent for p in moved}:
            _fs.fsync_dir(d)
        if new_dirs:
            _fs.fsync_dir(self.layout.objects)

    # -- bad bundles -------------------------------------------------------------------

    def bad_bundles(self) -> dict[str, str]:
        try:
            data = json.loads(self.layout.bad.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise StateError(f"{self.layout.bad}: corrupt state file: {e}") from e
        return {str(k): str(v) for k, v in data.items()}

    def mark_bad(self, manifest_sha256: str, reason: str) -> None:
        bad = self.bad_bundles()
        bad[manifest_sha256] = reason
        _fs.atomic_write(self.layout.bad, _dumps(bad), 0o600, fault="bad")

    def clear_bad(self, manifest_sha256: str) -> None:
        bad = self.bad_bundles()
        if bad.pop(manifest_sha256, None) is not None:
            _fs.atomic_write(self.layout.bad, _dumps(bad), 0o600, fault="bad")

    # -- audit log ---------------------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": _iso(time.time()), "event": event, **fields}
        self.layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _fs.append_line(self.layout.audit_log,
                        json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n",
                        fault=f"audit-{event}")
        return record

    def audit_records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with contextlib.suppress(FileNotFoundError), self.layout.audit_log.open("rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode() + b"\n"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
