"""The tar reader's shortcut for a header like the one before it reads exactly what the
full parse reads.

A bundle's headers differ only in name, size and checksum, so after one header passed
every check, the next is compared with it and only those three fields are checked
(``TarReader._parse_like``). Whatever bytes an attacker puts in a header, the reader
must give the same header or the same error as ``TarReader._parse_full`` alone.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from applier import _tar
from applier.errors import FormatError, UnsafeMemberError

from factory import CREATED

BUILT = _tar.header_bytes("blobs/" + "ab" * 32, 1234, CREATED)  # what the builder writes


def _reader(primed: bool) -> _tar.TarReader:
    reader = _tar.TarReader(io.BytesIO(), 1 << 40)
    if primed:
        reader._parse(BUILT, 0)
    return reader


def _outcome(primed: bool, block: bytes) -> tuple[Any, ...]:
    reader = _reader(primed)
    try:
        return ("ok", reader._parse(block, 512) if primed else reader._parse_full(block, 512))
    except (FormatError, UnsafeMemberError) as e:
        return ("error", type(e).__name__, str(e))


def _same_outcome(block: bytes) -> tuple[Any, ...]:
    shortcut = _outcome(True, block)
    assert shortcut == _outcome(False, block)
    return shortcut


def _with_checksum(block: bytes, field: bytes | None = None) -> bytes:
    """``block`` with a checksum that matches its bytes (as ``%06o\\0 `` unless given)."""
    b = bytearray(block)
    b[148:156] = b" " * 8
    b[148:156] = field if field is not None else b"%06o\0 " % sum(b)
    return bytes(b)


def _set(block: bytes, at: int, data: bytes) -> bytes:
    return _with_checksum(block[:at] + data + block[at + len(data):])


def test_a_header_like_the_last_is_read_without_the_full_parse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reader = _reader(primed=True)
    full: list[int] = []
    parse_full = _tar.TarReader._parse_full

    def counted(self: _tar.TarReader, block: bytes, offset: int) -> _tar.Header:
        full.append(offset)
        return parse_full(self, block, offset)

    monkeypatch.setattr(_tar.TarReader, "_parse_full", counted)
    header = reader._parse(_tar.header_bytes("blobs/" + "cd" * 32, 99, CREATED), 4096)
    assert header == _tar.Header(name="blobs/" + "cd" * 32, size=99, mode=0o644, offset=4096)
    assert full == []
    # A header unlike it (another mtime) takes the full parse, and becomes the model.
    reader._parse(_tar.header_bytes("blobs/x", 5, CREATED + 1), 8192)
    reader._parse(_tar.header_bytes("blobs/y", 6, CREATED + 1), 9216)
    assert full == [8192]


EDITS: list[tuple[str, bytes]] = [
    ("another name and size", _tar.header_bytes("blobs/" + "cd" * 32, 7, CREATED)),
    ("empty name", _set(BUILT, 0, b"\0" * 100)),
    ("space in the name", _set(BUILT, 3, b" ")),
    ("control byte in the name", _set(BUILT, 3, b"\x01")),
    ("non-ASCII name", _set(BUILT, 3, b"\xc3\xa9")),
    ("bytes after the name's NUL", _set(BUILT, 90, b"zz")),
    ("size not octal", _set(BUILT, 124, b"00000000009\0")),
    ("size empty", _set(BUILT, 124, b"\0" * 12)),
    ("size in base-256", _set(BUILT, 124, b"\x80" + b"\0" * 10 + b"\x01")),
    ("size with spaces", _set(BUILT, 124, b"  000002322 ")),
    ("checksum wrong", BUILT[:148] + b"000001\0 " + BUILT[156:]),
    ("checksum with 7 digits", _with_checksum(BUILT, b"%07o\0" % (sum(BUILT[:148])
                                                                + sum(BUILT[156:]) + 256))),
    ("checksum not octal", BUILT[:148] + b"0x1234\0 " + BUILT[156:]),
    ("checksum empty", BUILT[:148] + b"\0" * 8 + BUILT[156:]),
    ("a name prefix", _set(BUILT, 345, b"etc")),
    ("a link", _set(BUILT, 156, b"2")),
    ("a link target", _set(BUILT, 157, b"/etc/shadow")),
    ("setuid", _set(BUILT, 100, b"0004755\0")),
    ("another mode", _set(BUILT, 100, b"0000600\0")),
    ("GNU magic", _set(BUILT, 257, b"ustar  \0")),
    ("another mtime", _set(BUILT, 136, b"00000000001\0")),
]


@pytest.mark.parametrize("block", [b for _, b in EDITS], ids=[n for n, _ in EDITS])
def test_an_edited_header_reads_the_same_both_ways(block: bytes) -> None:
    assert len(block) == _tar.BLOCK
    _same_outcome(block)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_byte_edit_of_a_header_reads_the_same_both_ways(data: st.DataObject) -> None:
    block = bytearray(BUILT)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, _tar.BLOCK - 1), label="at")
        block[at] = data.draw(st.sampled_from(list(b"\0 /07889abz\x01\x7f\x80\xff")),
                              label="byte")
    # Most edits fail at the checksum; with it made to match, the later checks decide.
    fixed = data.draw(st.booleans(), label="checksum fixed")
    _same_outcome(_with_checksum(bytes(block)) if fixed else bytes(block))


# A small member is read in one piece with its padding (``whole``), a large one in
# chunks (``data``): both give the member's bytes and refuse a non-zero padding byte.
def _member(data: bytes, dirty: int | None = None) -> tuple[_tar.TarReader, _tar.Header]:
    padding = bytearray(_tar.padding(len(data)))
    if dirty is not None:
        padding[dirty] = 1
    raw = _tar.header_bytes("blobs/x", len(data), CREATED) + data + bytes(padding)
    reader = _tar.TarReader(io.BytesIO(raw), len(raw))
    header = reader.next_header()
    assert header is not None
    return reader, header


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 3000])
def test_a_member_read_whole_or_in_chunks_gives_its_bytes(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    reader, header = _member(data)
    assert reader.whole(header) == data
    assert reader.position == 512 + size + len(_tar.padding(size))
    reader, header = _member(data)
    assert b"".join(reader.data(header, chunk=100)) == data


@pytest.mark.parametrize("dirty", [0, 508])  # the first and the last padding byte
@pytest.mark.parametrize("read", ["whole", "chunks"])
def test_a_non_zero_padding_byte_is_refused_either_way(read: str, dirty: int) -> None:
    reader, header = _member(b"abc", dirty)

    def read_member() -> bytes:
        return reader.whole(header) if read == "whole" else b"".join(
            reader.data(header, chunk=2))

    with pytest.raises(FormatError, match="non-zero padding after member 'blobs/x'"):
        read_member()
