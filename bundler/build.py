"""``gitops-bundle build``, ``sign``, ``verify`` and ``inspect``: the workstation's operations.

Build = resolve the commit -> load the key (fail fast) -> render every host from the
commit's objects (render.py) -> git history bundle (git.py) -> manifest -> write its
canonical bytes to a scratch file, hashing them -> sign that digest -> stream the tar
(writer.py) -> read it back with the applier's own reader and verify it against the
signing key -> rename into place. Reproducible: every input comes from the commit
(time, sequence, content); the only outside input is ``--expires``, which counts from
``SOURCE_DATE_EPOCH`` when that is set.
Not for: the tar encoding (writer.py) or rendering (render.py).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tqdm import tqdm

from applier import _fs
from applier.bundle import MAX_MANIFEST_SIZE, BundleFile, read_bundle
from applier.errors import ApplierError
from applier.manifest import (
    BLOB_PREFIX,
    GIT_BUNDLE_NAME,
    MANIFEST_NAME,
    GitInfo,
    Manifest,
    Source,
    TrustUpdate,
    make_bundle_id,
)
from applier.sshsig import AllowedSigners, parse_signatures, signature_fingerprints, verify_one
from applier.verify import NAMESPACE, TrustPolicy, VerifiedManifest
from bundler.errors import BuildError, BuildUsageError, ManifestTooLargeError, OutputError
from bundler.git import GitRepo
from bundler.render import Fleet, fork_is_safe, render_fleet
from bundler.signing import HASH_ALGORITHM, SigningKey, sign, sign_digest
from bundler.writer import Member, compression_for, write_tar

logger = logging.getLogger(__name__)
BUILDER = "gitops-bundle 0.1.0"
MAX_EXPIRY = 100 * 365 * 86400  # --expires beyond a century is a typo, not a policy


@dataclass(frozen=True)
class BuildOptions:
    repo: Path
    out: Path
    rev: str = "HEAD"
    subpath: str = ""
    expires: int | None = None  # seconds from build time
    sequence: int | None = None
    compression: str | None = None
    hosts: tuple[str, ...] | None = None
    jobs: int | None = None
    trust: TrustUpdate | None = None  # a key rotation for hosts to adopt (applier/trust.py)
    # What source.branch and source.repo record, instead of what --rev names (a CI
    # checkout is detached: no branch) and the clone's directory name.
    branch: str | None = None
    repo_name: str | None = None


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    size: int
    dirty: bool
    warnings: tuple[str, ...]


def _progress_bar(total: int, desc: str) -> Any:  # tqdm ships no type hints
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)


def parse_duration(text: str) -> int:
    """``90s``, ``45m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise BuildUsageError(f"--expires: {text!r} is not a duration like 90s, 12h, 30d")
    seconds = int(text[:-1]) * units[text[-1]]
    if seconds <= 0:
        raise BuildUsageError("--expires: the duration must be positive")
    if seconds > MAX_EXPIRY:
        raise BuildUsageError(f"--expires: {text!r} is more than 100 years")
    return seconds


def _read_signers(path: Path, option: str = "") -> tuple[str, AllowedSigners]:
    """An allowed_signers file the operator named, parsed as a host parses it; any
    problem with it is theirs (exit 2), its message led by ``option``."""
    lead = f"{option}: " if option else ""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BuildUsageError(f"{lead}{path}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise BuildUsageError(f"{lead}{path}: not UTF-8 text") from e
    try:
        return text, AllowedSigners.from_text(text, str(path))
    except ApplierError as e:
        raise BuildUsageError(f"{lead}{e}") from e


def load_trust_update(path: Path, threshold: int, reset_sequence: bool) -> TrustUpdate:
    """A rotation from an allowed_signers file, checked as a host would parse it."""
    text, signers = _read_signers(path, "--trust-update")
    keys = len({e.key.blob for e in signers.entries})
    if keys < threshold:
        raise BuildUsageError(f"--trust-update: {path} has {keys} key(s), fewer than "
                              f"--trust-threshold {threshold}")
    return TrustUpdate(text, threshold, reset_sequence)


def build_now() -> int:
    """The build's clock: SOURCE_DATE_EPOCH when set (reproducible builds), else now."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is not None:
        if not env.isdigit():
            raise BuildUsageError(f"SOURCE_DATE_EPOCH={env!r} is not a Unix time")
        return int(env)
    return int(time.time())


def build(opts: BuildOptions, key: SigningKey) -> BuildResult:
    repo = GitRepo(opts.repo)
    commit = repo.resolve(opts.rev)
    info = repo.commit_info(opts.rev)
    dirty = repo.is_dirty()
    if dirty:
        logger.warning("the working tree has uncommitted changes; they are NOT in the bundle "
                       "(building commit %s)", commit[:12])
    out = opts.out.absolute()
    try:
        workdir = tempfile.TemporaryDirectory(prefix=".gitops-build-", dir=out.parent)
    except OSError as e:  # a missing or read-only directory, before any work is done
        raise OutputError(str(_fs.io_error(e, f"cannot write {out}"))) from e
    # --branch '' records none, like a commit id would.
    branch = (opts.branch or None) if opts.branch is not None else info.branch
    with workdir as tmp:
        history = Path(tmp) / "history.bundle"
        ref = f"refs/heads/{branch}" if branch else "refs/gitops/commit"
        # git packs the history while this process renders (0.6 s of a 200-host build).
        with repo.start_bundle(commit, ref, history) as pending:
            fleet = _render(repo, commit, opts)
            for w in fleet.warnings:
                logger.warning("%s", w)
            sequence = (opts.sequence if opts.sequence is not None
                        else repo.count_commits(commit))
            if sequence < 1:
                raise BuildUsageError(f"--sequence must be at least 1, not {sequence}")
            expires = None
            if opts.expires is not None:
                expires = max(build_now(), info.time) + opts.expires
            tips = pending.wait()
        with history.open("rb") as f:
            git_sha, git_size = _fs.hash_stream(f)
        manifest = Manifest(
            bundle_id=make_bundle_id(sequence, commit), sequence=sequence, created=info.time,
            expires=expires, trust=opts.trust,
            source=Source(repo=opts.repo_name or repo.name, commit=commit,
                          tree=info.tree, branch=branch, author=info.author,
                          subject=info.subject, path=fleet.path),
            builder=BUILDER, hosts=fleet.hosts,
            git=GitInfo(git_sha, git_size, tips),
        )
        written = _write_manifest(manifest, Path(tmp) / MANIFEST_NAME, out)
        _check_manifest_size(written.size, len(manifest.hosts))
        signature = sign_digest(written.sha512, key)
        compression = compression_for(out, opts.compression)
        # Forked before the blob reader starts, so the child holds none of its pipes.
        with _ParseBeside(written, next(iter(manifest.hosts))) as view, \
                repo.blob_reader() as reader, \
                _progress_bar(manifest.payload_size, "writing") as bar:
            def blob_chunks(digest: str) -> Callable[[], Iterator[bytes]]:
                return lambda: fleet.contents[digest].chunks(reader)

            def git_chunks() -> Iterator[bytes]:
                with history.open("rb") as f:
                    yield from _fs.iter_chunks(f, git_size)

            members = [Member(BLOB_PREFIX + d, size, blob_chunks(d))
                       for d, size in manifest.blobs.items()]
            members.append(Member(GIT_BUNDLE_NAME, git_size, git_chunks))
            size = write_tar(out, written.member(), signature, members, mtime=info.time,
                             compression=compression, progress=bar.update,
                             check=lambda p: _self_check(p, key, info.time, view))
    return BuildResult(out, manifest, size, dirty, fleet.warnings)


def _check_manifest_size(size: int, hosts: int) -> None:
    """Refuse a manifest no host would read, before the bundle is written; warn near it.

    The manifest lists every file of every host it is for (about 130 KB per host of
    550 files), and a host refuses one over ``MAX_MANIFEST_SIZE`` before it parses a
    byte. Without this, the build would write the whole bundle and fail its read-back.
    """
    if size > MAX_MANIFEST_SIZE:
        raise ManifestTooLargeError(
            f"{MANIFEST_NAME} for {hosts} host(s) would be {size} bytes, and a host refuses "
            f"one over {MAX_MANIFEST_SIZE}: build the fleet in several bundles (--host)")
    if size > MAX_MANIFEST_SIZE * 3 // 4:
        logger.warning("%s for %d host(s) is %d bytes, %d%% of the %d a host accepts: "
                       "plan to build the fleet in several bundles (--host)", MANIFEST_NAME,
                       hosts, size, size * 100 // MAX_MANIFEST_SIZE, MAX_MANIFEST_SIZE)


def _render(repo: GitRepo, commit: str, opts: BuildOptions) -> Fleet:
    # No monitor thread: it only tunes refresh rates, and a thread in this process
    # would keep render_fleet from forking its workers (render.py).
    tqdm.monitor_interval = 0
    with tqdm(desc="rendering", unit="host", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        # REPO given as a directory inside the working tree starts --path there.
        subpath = posixpath.join(repo.prefix, opts.subpath) if repo.prefix else opts.subpath
        return render_fleet(repo, commit, subpath,
                            hosts=list(opts.hosts) if opts.hosts else None, jobs=opts.jobs,
                            progress=bar.update)


@dataclass(frozen=True)
class _ManifestFile:
    """The manifest's canonical bytes, written to ``path`` and hashed on the way."""

    path: Path
    size: int
    sha256: str  # hex: the bundle's identity, as hosts compute it
    sha512: bytes  # what the SSHSIG signs (``signing.HASH_ALGORITHM``)

    def member(self) -> Member:
        def chunks() -> Iterator[bytes]:
            with self.path.open("rb") as f:
                yield from _fs.iter_chunks(f, self.size)
        return Member(MANIFEST_NAME, self.size, chunks)

    def read(self) -> bytes:
        """The bytes, if they are still the ones written (the parse's input)."""
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise OutputError(f"{self.path}: changed on disk while the bundle was built")
        return data


def _write_manifest(manifest: Manifest, path: Path, out: Path) -> _ManifestFile:
    """Write the canonical bytes to ``path`` a chunk at a time, hashing them as they go:
    a 200-host fleet's 26 MB manifest (and the copies joining it whole would make) never
    sits in memory."""
    sha256, sha512 = hashlib.sha256(), hashlib.new(HASH_ALGORITHM)
    size = 0
    try:
        with path.open("xb") as f:
            for chunk in manifest.canonical_chunks():
                f.write(chunk)
                sha256.update(chunk)
                sha512.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise OutputError(str(_fs.io_error(e, f"cannot write {out}"))) from e
    return _ManifestFile(path, size, sha256.hexdigest(), sha512.digest())


def _self_check(path: Path, key: SigningKey, now: int, view: _ParseBeside) -> None:
    """Read the finished file back with the host's reader: one definition of the format.

    The entries were checked when the ``Manifest`` was built and the bytes are their
    canonical serialisation, so the read-back parses one host's view: signature,
    canonical form, blob table and every member are still checked, without building
    every host's entries a second time (110,000 for a 200-host fleet). That parse of
    the signed bytes ran beside the writing (``_ParseBeside``); the read-back checks the
    file's signature and that its manifest is those very bytes before using it, as a
    host does with a view it built before (``verify_manifest``'s ``known``).
    """
    signers = AllowedSigners.from_text(f"builder {key.public_key.to_openssh()}\n", "builder")
    parsed = view.result()
    read_bundle(path, TrustPolicy(signers), now, host=view.host,
                known=lambda digest: parsed if digest == view.digest else None)


# The parse a _ParseBeside child runs: set before the fork, so never pickled.
_BESIDE: dict[str, tuple[_ManifestFile, str]] = {}


def _parse_job() -> Manifest:
    written, host = _BESIDE["job"]
    return Manifest.from_bytes(written.read(), host)


class _ParseBeside:
    """Parse one host's view of the written manifest in a forked process, beside the
    writing.

    The parse (JSON, canonical-form check, blob table: 1-2 s for a 200-host fleet) and
    the compression of the payload each keep a core busy and need nothing of each
    other. Where fork is unavailable or another thread runs (a lock could be held
    across the fork), ``result`` parses here instead. What comes back is the view
    ``Manifest.from_bytes`` built in the child, checked there by the same code, of the
    bytes whose digest the writing computed (read back and compared first).
    """

    def __init__(self, written: _ManifestFile, host: str) -> None:
        self.written = written
        self.host = host
        self.digest = written.sha256
        self._pool: ProcessPoolExecutor | None = None
        self._future: Future[Manifest] | None = None

    def __enter__(self) -> Self:
        if fork_is_safe():
            _BESIDE["job"] = (self.written, self.host)
            try:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("fork"))
                self._future = self._pool.submit(_parse_job)
            finally:
                _BESIDE.clear()
        return self

    def result(self) -> Manifest:
        if self._future is None:
            return Manifest.from_bytes(self.written.read(), self.host)
        try:
            return self._future.result()
        except BrokenProcessPool as e:
            raise BuildError(f"the manifest check process died: {e}") from e

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def verify_bundle(path: Path, allowed_signers: Path, threshold: int = 1,
                  now: int | None = None) -> VerifiedManifest:
    """What a host checks about the bundle itself (no host policy)."""
    _, signers = _read_signers(allowed_signers)
    trust = TrustPolicy(signers, threshold)
    return read_bundle(path, trust, int(time.time()) if now is None else now).verified


def add_signature(bundle: Path, key: SigningKey, out: Path) -> Manifest:
    """Co-sign: append a signature without changing a byte of the manifest.

    The existing signatures must verify against the keys they name (so a co-signer
    never endorses a tampered file), and every member is re-checked while copied.
    """
    with BundleFile(bundle) as src:
        manifest_bytes, sig_bytes = src.signed_part()
        for sig in parse_signatures(sig_bytes):
            verify_one(manifest_bytes, sig, NAMESPACE)
        if key.fingerprint in signature_fingerprints(sig_bytes):
            raise BuildUsageError(f"{bundle}: already signed by {key.fingerprint}")
        manifest = Manifest.from_bytes(manifest_bytes)
        new_sig = sig_bytes + sign(manifest_bytes, key)
        compression = compression_for(out, None) if out != bundle else src.compression
    staged: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=".gitops-sign-", dir=out.absolute().parent) as tmp:
        # Stream members to temp files while verifying, then write the new tar from them:
        # the output may be the input file, so it cannot be read while written.
        class _Sink:
            def __init__(self, name: str) -> None:
                self.path = Path(tmp) / hashlib.sha256(name.encode()).hexdigest()
                self.f = self.path.open("xb")

            def write(self, chunk: bytes) -> None:
                self.f.write(chunk)

            def commit(self) -> None:
                self.f.close()

            def abort(self) -> None:
                self.f.close()

        def sink(name: str, digest: str, size: int) -> _Sink:
            del digest, size
            s = _Sink(name)
            staged[name] = s.path
            return s

        with BundleFile(bundle) as src:
            src.signed_part()
            src.payload(manifest, sink)

        def chunks(name: str, size: int) -> Callable[[], Iterator[bytes]]:
            def gen() -> Iterator[bytes]:
                with staged[name].open("rb") as f:
                    yield from _fs.iter_chunks(f, size)
            return gen

        members = [Member(n, s, chunks(n, s)) for n, _, s in manifest.members()]
        write_tar(out, manifest_bytes, new_sig, members, mtime=manifest.created,
                  compression=compression)
    return manifest


def inspect_bundle(path: Path) -> dict[str, Any]:
    """Describe any bundle without trusting it: hosts, files, sizes, commit, signers.

    The manifest is parsed only after at least one signature in the file verified
    against the key it carries; whose key that is, is for ``verify`` to say.
    """
    with BundleFile(path) as bundle:
        manifest_bytes, sig_bytes = bundle.signed_part()
        signatures = parse_signatures(sig_bytes)
        for sig in signatures:
            verify_one(manifest_bytes, sig, NAMESPACE)
        m = Manifest.from_bytes(manifest_bytes)
        compression = bundle.compression
    return {
        "bundle_id": m.bundle_id, "sequence": m.sequence, "created": m.created,
        "expires": m.expires, "builder": m.builder, "compression": compression,
        "source": m.source.to_dict(),
        "signers": [s.public_key.fingerprint for s in signatures],
        "hosts": {name: {"files": [{"path": f.path, "size": f.size, "sha256": f.sha256,
                                    "mode": f"{f.mode:04o}", "owner": f.owner,
                                    "group": f.group} for f in h.files],
                         "total_size": sum(f.size for f in h.files)}
                  for name, h in m.hosts.items()},
        "blobs": len(m.blobs), "payload_size": m.payload_size,
        "git": {"sha256": m.git.sha256, "size": m.git.size, "tips": dict(m.git.tips)},
        "trust_update": m.trust is not None,
    }
