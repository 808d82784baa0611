"""Reading a bundle file: decompress, walk the strict tar, check every member as it streams.

The reading order is the format's: ``manifest.json`` and ``manifest.json.sig`` first
(bounded in size), handed to the caller's verification (``verify.py``); only then the
payload, where each member must be exactly the next one the *signed* manifest names,
with its size, and is hashed while it streams to a sink. A sink sees bytes before the
digest is known, so sinks write to private staging files and only ``commit`` once this
module has compared the digest. Nothing here touches a target path.

Not for: trust decisions (``verify.py``, ``policy.py``) or where staged bytes go
(``apply.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from applier import _gunzip, _tar
from applier._zstdframes import ZstdFrames
from applier.errors import (
    DigestMismatchError,
    FormatError,
    HostIOError,
    MissingMemberError,
    SizeLimitError,
    UnexpectedMemberError,
    VerificationError,
)
from applier.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from applier.verify import TrustPolicy, VerifiedManifest, verify_manifest

logger = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 64 << 20
MAX_SIGNATURE_SIZE = 64 << 10
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Read ahead of the tar reader; with _gunzip's queue, how far past a refused byte a
# bomb is inflated (2.25 MiB).
_DECOMPRESSED_BUFFER = 256 << 10
# A payload member up to this size is read in one piece with its padding (_tar.whole).
_WHOLE_MEMBER = 1 << 20


class BlobSink(Protocol):
    """Where one payload member's bytes go while they are hashed."""

    def write(self, chunk: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


# (member name, sha256, size) -> a sink, or None to hash and discard.
SinkFactory = Callable[[str, str, int], BlobSink | None]


def _payload_not_needed(name: str, digest: str, size: int) -> BlobSink | None:
    raise AssertionError("PAYLOAD_NOT_NEEDED is a marker, never called")


# What ``read_bundle``'s ``on_manifest`` returns to stop after the signed manifest.
PAYLOAD_NOT_NEEDED: SinkFactory = _payload_not_needed

# (bytes just verified, payload total): a progress bar the CLI may install. A context
# variable, so the streaming code reports progress without a parameter threaded
# through every caller; nothing is reported unless a caller asked.
_progress: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "bundle_progress", default=None)


@contextlib.contextmanager
def reporting_progress(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``callback(n, total)`` as payload bytes are verified inside this block."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


def compression_of(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


@contextlib.contextmanager
def _decompressed(raw: BinaryIO, path: Path,
                  frames: list[ZstdFrames] | None = None) -> Iterator[BinaryIO]:
    """The decompressed stream; for zstd, the frame checker goes into ``frames``."""
    head = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
    kind = compression_of(head)
    if kind == "gzip":
        # Inflated on a thread of its own (_gunzip.py); a C-level buffer in front, as
        # the tar reader makes three small reads per member (header, data, padding).
        with io.BufferedReader(_gunzip.GunzipReader(raw), _DECOMPRESSED_BUFFER) as gz:
            yield gz
    elif kind == "zstd":
        try:
            import zstandard  # noqa: PLC0415 - optional dependency, only for zstd bundles
        except ImportError:
            raise FormatError(
                f"{path}: bundle is zstd-compressed but the zstandard module is not installed"
            ) from None
        checked = ZstdFrames(raw)
        if frames is not None:
            frames.append(checked)
        with zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, checked), read_across_frames=True) as z:
            yield io.BufferedReader(z, _DECOMPRESSED_BUFFER)
    else:
        yield raw


def _open_regular(path: Path) -> io.BufferedReader:
    """Open a bundle only if it is a regular file.

    Opening with O_NONBLOCK first: a FIFO (or a device) planted on the stick must be
    refused, not block the host, which holds the apply lock while it reads.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise HostIOError(f"{path}: no such bundle file") from None
    except OSError as e:
        raise HostIOError(f"{path}: cannot read bundle: {e.strerror}") from e
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    if not regular:
        os.close(fd)
        raise FormatError(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@dataclass(frozen=True)
class ReadResult:
    """A verified bundle: its manifest, compression, and whether its payload was read."""

    verified: VerifiedManifest
    compression: str
    payload_read: bool = True


class BundleFile:
    """One pass over a bundle file. Use as a context manager; read in format order."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        self._tar: _tar.TarReader | None = None
        self._frames: list[ZstdFrames] = []  # a zstd bundle's frame checker
        self.compression = "none"

    def __enter__(self) -> BundleFile:
        try:
            raw = self._stack.enter_context(_open_regular(self.path))
            self.compression = compression_of(raw.peek(4)[:4])
            stream = self._stack.enter_context(_decompressed(raw, self.path, self._frames))
        except BaseException:
            self._stack.close()  # __exit__ is not called when __enter__ raises
            raise
        head_limit = (2 * _tar.BLOCK + MAX_MANIFEST_SIZE + MAX_SIGNATURE_SIZE + 2 * _tar.BLOCK)
        self._tar = _tar.TarReader(stream, head_limit)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def tar(self) -> _tar.TarReader:
        if self._tar is None:
            raise RuntimeError("BundleFile used outside its context")
        return self._tar

    def _small_member(self, name: str, limit: int) -> bytes:
        header = self.tar.next_header()
        if header is None:
            raise MissingMemberError(f"{self.path}: bundle has no {name}")
        if header.name != name:
            raise UnexpectedMemberError(
                f"{self.path}: first members must be {MANIFEST_NAME} then {SIGNATURE_NAME}, "
                f"found {header.name!r}"
            )
        if header.size > limit:
            raise SizeLimitError(f"{self.path}: {name} is {header.size} bytes (limit {limit})")
        # One read of the whole (bounded) member: joining 1 MiB chunks held a fleet's
        # 26 MB manifest twice over at the join.
        return b"".join(self.tar.data(header, chunk=max(header.size, 1)))

    def signed_part(self) -> tuple[bytes, bytes]:
        """The manifest bytes and the signature bytes, unparsed and untrusted."""
        with _wrap_stream_errors(self.path):
            manifest = self._small_member(MANIFEST_NAME, MAX_MANIFEST_SIZE)
            signature = self._small_member(SIGNATURE_NAME, MAX_SIGNATURE_SIZE)
        return manifest, signature

    def payload(self, manifest: Manifest, sink: SinkFactory | None = None) -> None:
        """Stream every payload member through its check; raise at the first mismatch."""
        members = list(manifest.members())
        # From here the signed manifest fixes the exact decompressed length.
        self.tar.limit = _tar.expected_length([size for _, _, size in members],
                                              start=self.tar.position)
        expected_names = {name for name, _, _ in members}
        seen: set[str] = set()
        report = _progress.get()
        total = sum(size for _, _, size in members)
        with _wrap_stream_errors(self.path):
            for name, digest, size in members:
                header = self.tar.next_header()
                if header is None:
                    raise MissingMemberError(
                        f"{self.path}: member {name} named by the manifest is missing"
                    )
                if header.name != name:
                    if header.name in seen or header.name in (MANIFEST_NAME, SIGNATURE_NAME):
                        raise UnexpectedMemberError(
                            f"{self.path}: duplicate member {header.name!r}")
                    if header.name in expected_names:
                        raise UnexpectedMemberError(
                            f"{self.path}: member {header.name!r} out of order "
                            f"(expected {name})")
                    raise UnexpectedMemberError(
                        f"{self.path}: member {header.name!r} is not named by the manifest")
                seen.add(name)
                if header.size != size:
                    raise DigestMismatchError(
                        f"{self.path}: {name} is {header.size} bytes, manifest says {size}")
                self._stream_member(header, digest, sink(name, digest, size) if sink else None)
                if report is not None:
                    report(size, total)
            extra = self.tar.next_header()
            if extra is not None:
                what = "duplicate" if extra.name in seen else "not named by the manifest"
                raise UnexpectedMemberError(f"{self.path}: member {extra.name!r} is {what}")
            self.tar.finish()
            # gzip checks its own end (_gunzip); zstd's reader stops quietly at EOF.
            if self._frames and not self._frames[0].complete:
                raise FormatError(f"{self.path}: zstd stream ends inside a frame (truncated)")

    def _stream_member(self, header: _tar.Header, digest: str, out: BlobSink | None) -> None:
        h = hashlib.sha256()
        try:
            chunks = ((self.tar.whole(header),) if header.size <= _WHOLE_MEMBER
                      else self.tar.data(header))
            for chunk in chunks:
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
            _check_digest(self.path, header.name, h.hexdigest(), digest)
        except BaseException:
            if out is not None:
                out.abort()
            raise
        if out is not None:
            out.commit()


def _check_digest(path: Path, name: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise DigestMismatchError(f"{path}: {name} has SHA-256 {actual}, manifest says {expected}")


@contextlib.contextmanager
def _wrap_stream_errors(path: Path) -> Iterator[None]:
    """Decompressor and I/O failures become one-line verification errors."""
    try:
        yield
    except VerificationError as e:
        text = str(e)
        if text.startswith(f"{path}:"):
            raise
        # The tar reader's own words ('bundle is truncated at byte N') name no file.
        raise type(e)(f"{path}: {text}") from e
    except (EOFError, zlib.error) as e:
        raise FormatError(f"{path}: corrupt or truncated compressed stream: {e}") from e
    except OSError as e:
        raise HostIOError(f"{path}: cannot read bundle: {e}") from e
    except Exception as e:  # zstandard.ZstdError has no importable base without the module
        if type(e).__module__.split(".")[0] == "zstandard":
            raise FormatError(f"{path}: corrupt zstd stream: {e}") from e
        raise


def read_bundle(path: str | os.PathLike[str], trust: TrustPolicy, now: int,
                sink: SinkFactory | None = None,
                on_manifest: Callable[[VerifiedManifest], SinkFactory | None] | None = None,
                host: str | None = None,
                known: Callable[[str], Manifest | None] | None = None,
                ) -> ReadResult:
    """Verify a whole bundle in one streaming pass; optionally stage members via a sink.

    ``on_manifest`` runs after the signature checked out and before the payload is
    read: the host uses it to apply policy and choose which blobs to stage; it returns
    ``PAYLOAD_NOT_NEEDED`` when nothing in the payload can change the outcome (then the
    payload is not read, and ``ReadResult.payload_read`` says so). ``host`` parses only
    that host's view of the manifest (``Manifest.from_bytes``); ``known`` is passed to
    ``verify_manifest``.
    """
    with BundleFile(path) as bundle:
        manifest_bytes, sig_bytes = bundle.signed_part()
        verified = verify_manifest(manifest_bytes, sig_bytes, trust, now, host, known)
        if on_manifest is not None:
            chosen = on_manifest(verified)
            if chosen is PAYLOAD_NOT_NEEDED:
                return ReadResult(verified, bundle.compression, payload_read=False)
            sink = chosen or sink
        bundle.payload(verified.manifest, sink)
        logger.debug("verified %s (%d members)", path, len(verified.manifest.blobs) + 1)
        return ReadResult(verified, bundle.compression)
