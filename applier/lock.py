"""One apply at a time: an exclusive POSIX record lock on ``state/lock``.

The kernel drops the lock when its holder dies, so a kill -9 never leaves a stale
lock behind, and it reports the holder's pid (``F_GETLK``), so the lock file is
never written: a refused command leaves the state directory byte-for-byte as it was.
POSIX record locks belong to a process, not to a file descriptor: a second
``locked()`` in the same process (a thread, or a nested call) would be granted at
once, and its ``close`` would drop the first holder's lock. So each lock file also
has an in-process mutex, taken first; within one process the second caller waits or
fails like another process would.
Not for: protecting against a second *host* sharing the state dir over NFS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator

from applier.errors import LockedError
from applier.paths import HostLayout

# struct flock on Linux (x86_64, aarch64): short type, short whence, off_t start,
# off_t len, pid_t pid, padded to 32 bytes.
_FLOCK = "hhqqi4x"


def holder_pid(fd: int) -> int | None:
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError:
        return None
    kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
    return None if kind == fcntl.F_UNLCK else int(pid)


_mutexes: dict[str, threading.Lock] = {}
_mutexes_guard = threading.Lock()


def _mutex(path: str) -> threading.Lock:
    with _mutexes_guard:
        return _mutexes.setdefault(os.path.realpath(path), threading.Lock())


@contextlib.contextmanager
def locked(layout: HostLayout, wait: float = 0.0) -> Iterator[None]:
    layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    deadline = time.monotonic() + wait
    mutex = _mutex(str(layout.lock))
    acquired = mutex.acquire(timeout=wait) if wait > 0 else mutex.acquire(blocking=False)
    if not acquired:
        raise LockedError(f"{layout.lock}: another gitops-apply in this process "
                          f"(pid {os.getpid()}) holds the lock")
    try:
        with _locked_file(layout, deadline):
            yield
    finally:
        mutex.release()


@contextlib.contextmanager
def _locked_file(layout: HostLayout, deadline: float) -> Iterator[None]:
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    pid = holder_pid(fd)
                    raise LockedError(
                        f"{layout.lock}: another gitops-apply (pid {pid or '?'}) holds the "
                        "lock") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
