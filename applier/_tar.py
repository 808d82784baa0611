"""The strict tar subset that format-1 bundles use: reading it from hostile input, writing it.

Python's ``tarfile`` understands far more than a bundle needs (GNU and PAX extensions,
sparse files, links, long names), and several of its extraction filters were bypassed
after the Python on many hosts was released. So the reader here parses POSIX ustar
headers itself and accepts only what the builder writes: regular files, short ASCII
names, no PAX/GNU headers, no links or devices, no setuid/setgid/sticky bits, and
nothing but zero padding after the end-of-archive marker. Everything is streamed: a
large member's data is yielded in chunks and never held whole; a small one may be read
in one piece with its padding (``whole``).

Not for: deciding which names are allowed (``bundle.py`` checks them against the
signed manifest) or decompression (``bundle.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from applier.errors import FormatError, SizeLimitError, UnsafeMemberError

BLOCK = 512
RECORD = 20 * BLOCK  # what tar(1) and Python pad archives to
_TYPE_NAMES = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
    b"4": "a block device", b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file",
    b"x": "a PAX extended header", b"g": "a PAX global header", b"L": "a GNU long name",
    b"K": "a GNU long link name", b"S": "a GNU sparse file", b"V": "a GNU volume header",
    b"M": "a GNU multi-volume file",
}


@dataclass(frozen=True)
class Header:
    """The fields of one regular-file member that a bundle reader may rely on."""

    name: str
    size: int
    mode: int
    offset: int  # byte offset of the header in the decompressed stream, for messages


_ZERO_BLOCK = bytes(BLOCK)
_OCTAL = re.compile(rb"[0-7]+")
_UNSAFE_NAME = re.compile(rb"[^\x21-\x7e]")


def _digits(field: bytes) -> bytes:
    """A numeric field without the NULs and spaces tar writers pad it with."""
    return field.rstrip(b"\0 ").lstrip(b" ")


def _octal(field: bytes, what: str, offset: int) -> int:
    text = _digits(field)
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        # Includes GNU base-256 numbers (high bit set): not part of the accepted subset.
        raise FormatError(f"tar header at byte {offset}: {what} is not an octal number")
    return int(text, 8)


class TarReader:
    """Reads members one by one from a decompressed stream, with a hard byte budget."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._f = stream
        self._pos = 0
        self.limit = limit
        self._pending = 0  # unread data + padding of the current member
        # The last fully parsed header's bytes other than name, size and checksum (the
        # only fields a builder's headers differ in), and their byte sum.
        self._like: tuple[bytes, bytes, bytes, int, int] | None = None

    @property
    def position(self) -> int:
        return self._pos

    def _read(self, n: int) -> bytes:
        if self._pos + n > self.limit:
            raise SizeLimitError(
                f"bundle expands past {self.limit} bytes at byte {self._pos}: "
                "refusing a stream larger than its signed manifest declares"
            )
        first = self._f.read(n)
        if len(first) == n:  # the common case: one read, no copy
            self._pos += n
            return first
        out = bytearray(first)
        while len(out) < n:
            chunk = self._f.read(n - len(out))
            if not chunk:
                raise FormatError(f"bundle is truncated at byte {self._pos + len(out)}")
            out += chunk
        self._pos += n
        return bytes(out)

    def next_header(self) -> Header | None:
        """The next member's header, or None at a valid end-of-archive."""
        if self._pending:
            raise FormatError("internal: previous member not fully read")
        offset = self._pos
        block = self._read(BLOCK)
        if block == _ZERO_BLOCK:
            if self._read(BLOCK) != _ZERO_BLOCK:
                raise FormatError(f"tar end marker at byte {offset} is not two zero blocks")
            return None
        return self._parse(block, offset)

    def _parse(self, block: bytes, offset: int) -> Header:
        """The header in ``block``, checked; the next headers of a bundle mostly differ
        from this one only in name, size and checksum, and then take ``_parse_like``."""
        like = self._like
        if (like is not None and block[100:124] == like[0] and block[136:148] == like[1]
                and block[156:] == like[2]):
            header = self._parse_like(block, offset, like[3], like[4])
            if header is not None:
                return header
        header = self._parse_full(block, offset)
        if not block[345:500].strip(b"\0"):  # no name prefix: full = the name field
            self._like = (block[100:124], block[136:148], block[156:],
                          sum(block[100:124]) + sum(block[136:148]) + sum(block[156:]),
                          header.mode)
        return header

    @staticmethod
    def _parse_like(block: bytes, offset: int, fixed_sum: int, mode: int) -> Header | None:
        """``block``'s header if it is fully valid, knowing that all its bytes but the
        name, size and checksum fields equal a header ``_parse_full`` accepted, with no
        name prefix; None sends it to ``_parse_full``, which words any error.

        Those equal bytes already passed every check there (magic, type, link target,
        prefix, mode); what is left is the name, the size and the checksum.
        """
        name_field = block[:100]
        size_field = block[124:136]
        computed = fixed_sum + sum(name_field) + sum(size_field) + 8 * 0x20
        raw_name = name_field.split(b"\0", 1)[0]
        size = _digits(size_field)
        stored = _digits(block[148:156])
        if (not raw_name or _UNSAFE_NAME.search(raw_name) or not _OCTAL.fullmatch(size)
                or not _OCTAL.fullmatch(stored) or int(stored, 8) != computed):
            return None
        return Header(name=raw_name.decode("ascii"), size=int(size, 8), mode=mode,
                      offset=offset)

    def _parse_full(self, block: bytes, offset: int) -> Header:
        stored = _octal(block[148:156], "checksum", offset)
        computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if stored != computed:
            raise FormatError(f"tar header at byte {offset} has a bad checksum")
        if block[257:265] != b"ustar\x0000":
            raise FormatError(f"tar header at byte {offset} is not POSIX ustar")
        typeflag = block[156:157]
        raw_name = block[0:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0]
        full = prefix + b"/" + raw_name if prefix else raw_name
        try:
            name = full.decode("ascii")
        except UnicodeDecodeError:
            raise UnsafeMemberError(
                f"tar member at byte {offset} has a non-ASCII name {full[:100]!r}"
            ) from None
        if typeflag not in (b"0", b"\0"):
            what = _TYPE_NAMES.get(typeflag, f"of unknown type {typeflag!r}")
            raise UnsafeMemberError(f"tar member {name!r} is {what}: only regular files allowed")
        if block[157:257].strip(b"\0"):
            raise UnsafeMemberError(f"tar member {name!r} carries a link target")
        if _UNSAFE_NAME.search(full):
            raise UnsafeMemberError(f"tar member {name!r} has a control or space character")
        mode = _octal(block[100:108], "mode", offset)
        if mode & 0o7000:
            raise UnsafeMemberError(
                f"tar member {name!r} has setuid/setgid/sticky mode {mode:o}"
            )
        size = _octal(block[124:136], "size", offset)
        return Header(name=name, size=size, mode=mode, offset=offset)

    def data(self, header: Header, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The member's bytes in chunks, then its padding is consumed and checked."""
        left = header.size
        pad = -header.size % BLOCK
        self._pending = left + pad
        while left:
            piece = self._read(min(chunk, left))
            left -= len(piece)
            self._pending -= len(piece)
            yield piece
        if pad:
            _check_padding(self._read(pad), 0, header)
        self._pending = 0

    def whole(self, header: Header) -> bytes:
        """The member's bytes in one read with its padding, which is checked (a small
        member: a bundle's payload is mostly files of a few KiB, and reading data and
        padding apart cost a Python step each)."""
        size = header.size
        pad = -size % BLOCK
        self._pending = size + pad
        block = self._read(size + pad)
        if pad:
            _check_padding(block, size, header)
        self._pending = 0
        return block[:size] if pad else block

    def finish(self) -> None:
        """After the end marker: only zero padding (at most one record) up to EOF."""
        slack = 0
        while True:
            chunk = self._f.read(BLOCK)
            if not chunk:
                return
            slack += len(chunk)
            if chunk.count(0) != len(chunk):
                raise FormatError(f"trailing data after the tar end at byte {self._pos}")
            if slack > RECORD:
                raise FormatError(f"more than {RECORD} bytes of padding after the tar end")
            self._pos += len(chunk)


def _check_padding(block: bytes, start: int, header: Header) -> None:
    """``block[start:]`` is a member's padding: zeros only. Padding is not covered by
    any digest, so no unsigned byte can ride along inside an accepted bundle."""
    if block.count(0, start) != len(block) - start:
        raise FormatError(f"non-zero padding after member {header.name!r}")


def header_bytes(name: str, size: int, mtime: int) -> bytes:
    """A deterministic ustar header: mode 0644, uid/gid 0, no user/group names.

    Byte for byte what ``tarfile`` writes for such a member; built directly for the
    common short name (a bundle has a header per blob: 10,000 through ``TarInfo``
    cost most of a second), through ``tarfile`` otherwise.
    """
    raw = name.encode("ascii")
    if len(raw) <= 100 and size < 8**11 and 0 <= mtime < 8**11:
        head = (raw.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" * 2
                + b"%011o\0" % size + b"%011o\0" % mtime)
        # typeflag, linkname, magic+version, uname, gname, then devmajor, devminor,
        # prefix and padding all NUL (no device numbers on a regular file).
        tail = b"0" + bytes(100) + b"ustar\x0000" + bytes(64) + bytes(16 + 155 + 12)
        checksum = sum(head) + sum(tail) + 8 * 0x20
        return head + b"%06o\0 " % checksum + tail
    import tarfile  # noqa: PLC0415 - the builder's rare long name; hosts never write tars

    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def end_of_archive(total_written: int) -> bytes:
    """Two zero blocks, then zero padding up to a whole record, as tar(1) writes."""
    end = total_written + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


def expected_length(sizes: list[int], start: int = 0) -> int:
    """The exact decompressed length of members of these sizes written from ``start`` on."""
    body = start + sum(BLOCK + size + (-size % BLOCK) for size in sizes) + 2 * BLOCK
    return body + (-body % RECORD)
