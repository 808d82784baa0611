"""Filesystem primitives every writer uses: atomic replace, fsync, streamed hashing.

One helper per concern so that durability rules live in one place: a file is made
durable by temp file in the same directory, write, fsync, ``os.replace``, fsync of the
directory; the temp is removed on failure. Not for: deciding *what* to write (see
``transaction.py``) or resolving targets under a root (see ``paths.py``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from applier import _faults
from applier.errors import HostIOError

CHUNK = 1 << 20


def random_hex(nbytes: int) -> str:
    """``secrets.token_hex``: the same urandom bytes, without importing ``secrets``,
    whose ``random`` and ``hmac`` imports every command would otherwise pay for."""
    return os.urandom(nbytes).hex()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(paths: list[str] | list[Path], threshold: int = 32) -> bool:
    """fsync each file, or run one sync(2) when there are more than ``threshold``.

    For thousands of small files one sync(2) is far cheaper than an fsync each (it is
    what ``tar -x && sync`` pays). Returns True when sync(2) ran, which also made every
    directory entry durable, so the caller can skip its directory fsyncs.
    """
    if len(paths) > threshold:
        os.sync()
        return True
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return False


def io_error(e: OSError, what: str) -> HostIOError:
    """Turn an OSError into the one-line error the CLI prints, naming the path."""
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return HostIOError(f"{what}: {reason}")


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644,
                 fault: str = "atomic-write", dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new bytes.

    With ``dir_fd``, ``path`` is a name in that open directory (which a caller opened
    without following a symlink), and every step goes through it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{random_hex(6)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        _faults.point(f"{fault}:written")
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        _faults.point(f"{fault}:renamed")
        if dir_fd is None:
            fsync_dir(path.parent)
        else:
            os.fsync(dir_fd)
        _faults.point(f"{fault}:synced")
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise io_error(e, f"cannot write {path}") from e


def append_line(path: str | os.PathLike[str], line: bytes, fault: str = "append") -> None:
    """Append one record durably (the audit log is append-only, never rewritten)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        _faults.point(fault)
    except OSError as e:
        raise io_error(e, f"cannot append to {path}") from e


def hash_stream(f: BinaryIO, limit: int | None = None) -> tuple[str, int]:
    """SHA-256 and length of a stream, reading in chunks (never the whole file)."""
    h = hashlib.sha256()
    n = 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
        if limit is not None and n > limit:
            break
    return h.hexdigest(), n


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """SHA-256 and size of a regular file, refusing to follow a final symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        return hash_stream(f)


def open_exclusive(path: str | os.PathLike[str], mode: int = 0o600) -> BinaryIO:
    """Create a new file for writing; never reuse or follow anything already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    return os.fdopen(fd, "wb")


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], mode: int) -> None:
    """Copy ``src`` to a new file ``dst`` (exclusive create), in kernel where possible."""
    with open(src, "rb") as fin, open_exclusive(dst, mode) as fout:
        copy_open(fin, fout)


def copy_open(fin: BinaryIO, fout: BinaryIO) -> None:
    """Copy the rest of ``fin`` into ``fout`` with copy_file_range, else in chunks.

    In-kernel copying skips two trips through user space (and reflinks on filesystems
    that can); it is refused across filesystems and by some, hence the fallback.
    """
    size = os.fstat(fin.fileno()).st_size
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), size - copied)
            if n == 0:
                break
            copied += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    if copied < size:
        fin.seek(copied)
        fout.seek(copied)
        while chunk := fin.read(CHUNK):
            fout.write(chunk)


def iter_chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes from ``f`` in chunks; short reads are the caller's problem."""
    left = size
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def remove_quietly(path: str | os.PathLike[str]) -> bool:
    """Unlink a file if it is there; True if something was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
