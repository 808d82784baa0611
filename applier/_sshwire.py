"""Bounds-checked reading and writing of the SSH wire encoding (RFC 4251 section 5).

For: the few types that SSHSIG, public key blobs and signature blobs use (byte, uint32,
string). Every length read from the data is checked against what is left before it is
used, so a hostile signature can make the parser fail but never read past its input.
Not for: deciding what a field means; that is ``sshsig.py``'s job.
"""

from __future__ import annotations

import struct


class WireError(ValueError):
    """The bytes are not the SSH wire encoding the reader expected."""


class Reader:
    """Reads SSH wire fields from a byte string, front to back, never past its end."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int, field: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise WireError(f"{self._what}: truncated {field}")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def raw(self, n: int, field: str) -> bytes:
        return self._take(n, field)

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u32(self, field: str) -> int:
        value: int = struct.unpack(">I", self._take(4, field))[0]
        return value

    def string(self, field: str) -> bytes:
        # The length is checked by _take against the bytes actually left.
        return self._take(self.u32(field), field)

    def text(self, field: str) -> str:
        """A string that must be printable ASCII: names, namespaces, algorithms."""
        value = self.string(field)
        if any(b < 0x20 or b > 0x7E for b in value):
            raise WireError(f"{self._what}: {field} is not printable ASCII")
        return value.decode("ascii")

    def end(self) -> None:
        """Insist that nothing follows: trailing bytes could hide a second meaning."""
        if self._pos != len(self._data):
            left = len(self._data) - self._pos
            raise WireError(f"{self._what}: {left} unexpected trailing bytes")


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def string(value: bytes | str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return u32(len(data)) + data
