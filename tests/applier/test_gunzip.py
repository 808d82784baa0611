"""The bundle reader's gzip stream: inflated on a thread, checked by zlib, bounded ahead.

What gzip(1) accepts is read (several members, zero padding between and after them);
a truncated or corrupt stream is refused at the read that needs the bytes; the thread
never runs more than a few chunks ahead of the reader, and is gone once the stream is
closed, however early.
"""

from __future__ import annotations

import gzip
import io
import os
import threading
import zlib

import pytest
from hostile import CountingReader

from applier import _gunzip


def _members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(p, mtime=0) for p in parts)


def _payload(n: int, seed: int) -> bytes:
    # Compressible (long members inflate to many chunks) but not constant.
    return b"".join(b"%08d %d\n" % (i, seed) for i in range(n // 11))


def read_all(data: bytes, size: int = 1 << 20) -> bytes:
    with io.BufferedReader(_gunzip.GunzipReader(io.BytesIO(data)), 256 << 10) as f:
        out = bytearray()
        while chunk := f.read(size):
            out += chunk
        return bytes(out)


def test_several_large_members_with_zero_padding_read_as_gzip_reads_them() -> None:
    # Each member inflates to several OUT_CHUNKs: a member's end falls inside a
    # chunk-limited call, where zlib leaves input in both unconsumed_tail and
    # unused_data.
    parts = [_payload(3 * _gunzip.OUT_CHUNK + 1234, s) for s in range(3)] + [os.urandom(1000)]
    data = _members(parts[0], parts[1]) + bytes(100) + _members(parts[2], parts[3]) + bytes(7)
    assert read_all(data) == gzip.decompress(data) == b"".join(parts)
    assert read_all(data, size=511) == b"".join(parts)
    assert read_all(b"") == b""


@pytest.mark.parametrize(("data", "error"), [
    (_members(b"x" * 100_000)[:-4], "end-of-stream marker"),
    (_members(b"x" * 100_000)[:20], "end-of-stream marker"),
    (_members(b"ok") + b"PAYLOAD", "not a gzip member"),
])
def test_a_truncated_or_trailing_stream_is_refused(data: bytes, error: str) -> None:
    with pytest.raises((EOFError, zlib.error), match=error):
        read_all(data)


@pytest.mark.parametrize("tiny", [b"", b"x"], ids=["empty", "one-byte"])
def test_a_stream_of_tiny_members_is_refused_early(tiny: bytes) -> None:
    """Tiny members yield (nearly) no byte, so no byte budget stops them: without a
    limit a file of 20-byte members is inflated member by member for as long as it
    lasts, under the host lock. Members of a reasonable size (a builder writes one per
    MiB, bgzip one per 64 KiB) are read however many there are."""
    few = _members(*[tiny] * (_gunzip.MAX_EMPTY_MEMBERS - 1), b"data")
    assert read_all(few) == tiny * (_gunzip.MAX_EMPTY_MEMBERS - 1) + b"data"
    blocks = [os.urandom(_gunzip.MIN_MEMBER_OUTPUT) for _ in range(200)]
    assert read_all(_members(*blocks)) == b"".join(blocks)
    # A streaming writer that flushes a member per tar entry (a header and a block).
    entries = [bytes(512) + b"x" * 512 for _ in range(2000)]
    assert read_all(_members(*entries)) == b"".join(entries)
    stream = _members(b"head") + _members(tiny) * 1_000_000  # 20 MB
    counter = [0]
    raw = CountingReader(io.BytesIO(stream), counter)
    with pytest.raises(zlib.error, match=r"more gzip members \(\d+\) than \d+ inflated"), \
            io.BufferedReader(_gunzip.GunzipReader(raw), 256 << 10) as f:  # type: ignore[arg-type]
        f.read()
    assert counter[0] <= 2 * _gunzip.IN_CHUNK


def test_a_corrupt_trailer_is_refused_in_gzip_words() -> None:
    data = bytearray(_members(_payload(1 << 20, 1)))
    data[-6] ^= 0x01  # inside the CRC-32
    with pytest.raises(zlib.error, match="CRC check failed"):
        read_all(bytes(data))
    data = bytearray(_members(_payload(1 << 20, 1)))
    data[-2] ^= 0x01  # inside the length
    with pytest.raises(zlib.error, match="length check failed"):
        read_all(bytes(data))


def test_inflating_stays_a_bounded_distance_ahead_and_stops_on_close() -> None:
    # 48 MiB that compress about 4:1. The reader takes 4 KiB and waits; the thread
    # may run AHEAD chunks ahead, no further, so it reads a few input chunks at most.
    data = _members(_payload(48 << 20, 7))
    taken = [0]
    before = threading.active_count()
    reader = _gunzip.GunzipReader(CountingReader(io.BytesIO(data), taken))  # type: ignore[arg-type]
    buf = bytearray(4096)
    assert reader.readinto(buf) == 4096
    threading.Event().wait(1.0)
    assert taken[0] <= 4 * _gunzip.IN_CHUNK < len(data) // 4
    reader.close()
    assert threading.active_count() == before
