"""Writing the format-1 tar: deterministic headers, streaming members, optional compression.

Byte-identical output for identical input is a format promise, so every source of
variation is pinned: member order (manifest, signature, blobs by digest, git history),
mtime (the commit time), uid/gid 0, mode 0644, no user names, gzip as one member per
1 MiB of tar (each with mtime 0 and no file name, compressed on all cores), zstd
single-threaded at a fixed level. The file is written to a temp
name beside the output and renamed into place only when complete and verified, so
a failed build leaves no bundle behind. Not for: choosing the content (build.py).
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import secrets
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from applier import _fs, _tar
from applier.errors import ApplierError
from applier.manifest import MANIFEST_NAME, SIGNATURE_NAME
from bundler.errors import BuildError, BuildUsageError, OutputError

COMPRESSIONS = ("none", "gzip", "zstd")
GZIP_LEVEL = 6
# Uncompressed tar bytes per gzip member: fixed, so the output stays byte-identical;
# large, so splitting costs nothing measurable in size (deflate's window is 32 KiB).
GZIP_BLOCK = 1 << 20
ZSTD_LEVEL = 10


@dataclass(frozen=True)
class Member:
    """One payload member: its name, size and a way to stream its bytes."""

    name: str
    size: int
    chunks: Callable[[], Iterable[bytes]]


def compression_for(path: Path, requested: str | None) -> str:
    if requested is not None:
        return requested
    name = path.name
    if name.endswith((".tar.gz", ".tgz")):
        return "gzip"
    if name.endswith((".tar.zst", ".tzst")):
        return "zstd"
    return "none"


def _gzip_member(block: bytes) -> bytes:
    return gzip.compress(block, compresslevel=GZIP_LEVEL, mtime=0)


class _ParallelGzip:
    """gzip output as a series of members, each one ``GZIP_BLOCK`` of the tar, compressed
    on every core.

    Compression is most of a build's writing (about 2 s of a 200-host fleet's 53 MB);
    zlib releases the GIL while it compresses and checksums, so threads use every core.
    The members are written in order, and at most two per thread are in flight (memory
    stays bounded for a 1 GiB payload). RFC 1952 and FORMAT.md allow concatenated
    members; every gzip reader (``gzip -d``, Python's ``gzip``) reads them as one stream.
    """

    def __init__(self, raw: BinaryIO, threads: int) -> None:
        self._raw = raw
        self._buf = bytearray()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gzip")
        self._pending: deque[Future[bytes]] = deque()
        self._in_flight = 2 * threads
        self._members = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= GZIP_BLOCK:
            self._submit(bytes(self._buf[:GZIP_BLOCK]))
            del self._buf[:GZIP_BLOCK]
        return len(data)

    def _submit(self, block: bytes) -> None:
        self._pending.append(self._pool.submit(_gzip_member, block))
        self._members += 1
        while len(self._pending) > self._in_flight:
            self._raw.write(self._pending.popleft().result())

    def finish(self) -> None:
        if self._buf or not self._members:  # an empty stream is one empty member
            self._submit(bytes(self._buf))
            self._buf.clear()
        while self._pending:
            self._raw.write(self._pending.popleft().result())

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


@contextlib.contextmanager
def _compressed(raw: BinaryIO, compression: str) -> Iterator[BinaryIO]:
    if compression == "gzip":
        gz = _ParallelGzip(raw, os.cpu_count() or 1)
        try:
            yield gz  # type: ignore[misc]
            gz.finish()
        finally:
            gz.close()
    elif compression == "zstd":
        try:
            import zstandard  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise BuildUsageError("zstd output needs the zstandard module "
                                  "(pip install 'gitops-airgap[zstd]')") from None
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True)
        with cctx.stream_writer(raw, closefd=False) as z:
            yield z
    else:
        yield raw


def _check_size(member: Member, written: int) -> None:
    if written != member.size:
        raise BuildError(f"{member.name}: wrote {written} bytes, expected {member.size}")


def _in_memory(name: str, data: bytes) -> Member:
    return Member(name, len(data), lambda: (data,))


def regular_or_absent(path: Path) -> bool:
    """Whether a bundle may be renamed over ``path``: nothing is there, or a regular
    file (a symlink counts as what it points to; the link itself is replaced)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:  # nothing there, or a dangling link (which is replaced)
        return True
    except OSError:
        return True  # unreadable or too long a name: the write says why


def write_tar(out: Path, manifest: bytes | Member, signature_bytes: bytes,
              members: Iterable[Member], mtime: int, compression: str,
              progress: Callable[[int], None] | None = None,
              check: Callable[[Path], None] | None = None) -> int:
    """Write the bundle to ``out`` atomically; ``check`` may veto the finished temp file.

    ``manifest`` is its bytes or, for a manifest too large to hold (a build's), a
    ``Member`` streaming them from a file; ``progress`` counts the payload's bytes.
    """
    head = [manifest if isinstance(manifest, Member) else _in_memory(MANIFEST_NAME, manifest),
            _in_memory(SIGNATURE_NAME, signature_bytes)]
    if head[0].name != MANIFEST_NAME:
        raise ValueError(f"the first member must be {MANIFEST_NAME}, not {head[0].name}")
    # Not named after ``out``: a name near 255 bytes would leave no room for a suffix.
    tmp = out.with_name(f".gitops-bundle-{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as raw:
            with _compressed(raw, compression) as f:
                written = 0
                for i, m in enumerate(itertools.chain(head, members)):
                    f.write(_tar.header_bytes(m.name, m.size, mtime))
                    n = 0
                    for chunk in m.chunks():
                        f.write(chunk)
                        n += len(chunk)
                        if progress is not None and i >= len(head):
                            progress(len(chunk))
                    _check_size(m, n)
                    f.write(_tar.padding(m.size))
                    written += _tar.BLOCK + m.size + len(_tar.padding(m.size))
                f.write(_tar.end_of_archive(written))
            raw.flush()
            os.fsync(raw.fileno())
        if check is not None:
            check(tmp)
        if not regular_or_absent(out):
            raise OutputError(f"cannot write {out}: it exists and is not a regular file")
        os.replace(tmp, out)
        _fs.fsync_dir(out.parent)
        return out.stat().st_size
    except OSError as e:
        raise OutputError(str(_fs.io_error(e, f"cannot write {out}"))) from e
    except (BuildError, ApplierError):
        raise
    finally:
        with contextlib.suppress(OSError):  # never hide the error that brought us here
            tmp.unlink()
