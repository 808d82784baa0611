"""Gzip decompression on a thread of its own, a bounded distance ahead of the reader.

After hashing, inflating is the largest cost of reading a bundle, and zlib releases
the GIL while it inflates, as hashlib does while it hashes and the kernel while it
reads and writes: with a second core, a thread that reads and inflates the file while
the reader parses, hashes and stages what came before takes the inflating off the
reader's critical path. ``gzip.GzipFile`` inflates in the caller's thread.

The stream is what gzip(1) and ``GzipFile`` accept: one or more gzip members (the
builder writes one per MiB of tar), each checked by zlib itself against its CRC-32
and length; zero bytes between or after members are skipped, anything else after a
member must be another member. The thread works at most ``AHEAD`` chunks of
``OUT_CHUNK`` bytes ahead of the reader (bounded memory, and a bounded amount
inflated past a byte the reader refuses: a bomb is inflated no further), and any
error it meets is raised in the reader, at the read that needed the data.
Not for: zstd (its library has its own reader) or what the bytes mean (``_tar``).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

IN_CHUNK = 256 << 10
OUT_CHUNK = 256 << 10
AHEAD = 8
MAX_EMPTY_MEMBERS = 64  # members allowed beyond one per MIN_MEMBER_OUTPUT inflated
# A member per tar entry (a streaming writer's flush per file) inflates to at least
# a 512-byte header and 512 bytes of data; a flood of one-byte members does not.
MIN_MEMBER_OUTPUT = 512
_GZIP = 16 + zlib.MAX_WBITS  # zlib parses the gzip header and checks the trailer

_ZLIB_WORDS = {
    "incorrect data check": "CRC check failed",
    "incorrect length check": "length check failed",
    "incorrect header check": "not a gzip member",
}


def _clear(e: zlib.error) -> zlib.error:
    """zlib's words for a bad trailer or header, as gzip(1) would put them."""
    text = str(e)
    for words, clear in _ZLIB_WORDS.items():
        if words in text:
            return zlib.error(clear)
    return e


def inflate(raw: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of a gzip stream, in chunks of at most ``OUT_CHUNK``."""
    member: Any = None  # the zlib decompressor of the member being read
    members = 0
    produced = 0  # bytes inflated so far
    while data := raw.read(IN_CHUNK):
        while data:
            if member is None:
                data = data.lstrip(b"\0")
                if not data:
                    break
                member = zlib.decompressobj(_GZIP)
                members += 1
                if members > MAX_EMPTY_MEMBERS + produced // MIN_MEMBER_OUTPUT:
                    # Each member costs a decompressor and a loop, and a tiny one yields
                    # (nearly) nothing, so no byte budget stops a file of them: it would
                    # hold the host lock for as long as it lasts. The builder writes a
                    # member per MiB of tar; other writers one per file at most.
                    raise zlib.error(f"more gzip members ({members}) than {produced} "
                                     "inflated bytes justify")
            try:
                out = member.decompress(data, OUT_CHUNK)
                while True:
                    if out:
                        produced += len(out)
                        yield out
                    # Output stops at OUT_CHUNK: the rest waits as unconsumed input
                    # or inside zlib; ask until a call returns less than a chunk. At
                    # the member's end the input left is unused_data (unconsumed_tail
                    # may still hold a stale copy of it).
                    if member.eof or (len(out) < OUT_CHUNK and not member.unconsumed_tail):
                        break
                    out = member.decompress(member.unconsumed_tail, OUT_CHUNK)
            except zlib.error as e:
                raise _clear(e) from None
            if member.eof:
                data = member.unused_data
                member = None
            else:
                data = b""
    if member is not None:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


class GunzipReader(io.RawIOBase):
    """A readable stream of the inflated bytes, inflated on a thread of its own.

    Wrap it in an ``io.BufferedReader``; ``close`` stops and joins the thread.
    """

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(AHEAD)
        self._stop = threading.Event()
        self._chunk = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._run, name="gunzip", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.05)
                return True
        return False

    def _run(self) -> None:
        try:
            for chunk in inflate(self._raw):
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, raised there
            self._put(e)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._chunk:
            if self._done:
                return 0
            item = self._queue.get()
            if item is None or isinstance(item, BaseException):
                self._done = True
                if item is not None:
                    raise item
                return 0
            self._chunk = memoryview(item)
        n = min(len(buffer), len(self._chunk))
        buffer[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            while self._thread.is_alive():  # a put may be waiting for room
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)
            self._thread.join()
        super().close()
