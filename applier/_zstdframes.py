"""The frame structure of a zstd stream, checked as its bytes pass to the decompressor.

The zstandard module's stream reader stops quietly at the end of the input: a stream
cut inside its last frame (its 4-byte checksum, say) reads as complete, and a
skippable frame (bytes any reader ignores) rides along unnoticed. gzip's reader here
refuses both (``_gunzip.py``); this gives zstd bundles the same rule without a second
pass over the file: the frame and block headers (RFC 8878) are followed as the reader
pulls bytes, block contents are skipped, and ``complete`` says whether the stream
ended between two frames. Not for: decompressing (the zstandard module does that).
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO

from applier.errors import FormatError

_MAGIC = b"\x28\xb5\x2f\xfd"
_FCS_BYTES = (0, 2, 4, 8)  # by Frame_Content_Size_flag (0 with Single_Segment: 1 byte)
_DICT_BYTES = (0, 1, 2, 4)


class ZstdFrames(io.RawIOBase):
    """A readable stream that passes ``raw`` through and follows its frames."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._state = "magic"
        self._need = 4  # header bytes the current state waits for
        self._head = bytearray()
        self._skip = 0  # block content bytes to pass over
        self._checksum = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._feed(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    @property
    def complete(self) -> bool:
        """Whether the bytes so far end exactly after a frame (or are empty)."""
        return self._state == "magic" and not self._head and not self._skip

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                continue
            take = min(self._need - len(self._head), end - pos)
            self._head += data[pos:pos + take]
            pos += take
            if len(self._head) == self._need:
                self._step(bytes(self._head))
                self._head.clear()

    def _step(self, head: bytes) -> None:
        state = self._state
        if state == "magic":
            if head == _MAGIC:
                self._state, self._need = "descriptor", 1
            elif head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
                raise FormatError("zstd stream holds a skippable frame: bytes no signature "
                                  "covers, refused")
            else:
                raise FormatError("zstd stream: data after the last frame is not a frame")
        elif state == "descriptor":
            d = head[0]
            if d & 0x08:
                raise FormatError("zstd frame header has its reserved bit set")
            single = bool(d & 0x20)
            fcs = _FCS_BYTES[d >> 6] or (1 if single else 0)
            self._checksum = bool(d & 0x04)
            rest = (0 if single else 1) + _DICT_BYTES[d & 0x03] + fcs
            self._state, self._need = ("rest", rest) if rest else ("block", 3)
        elif state == "rest":
            self._state, self._need = "block", 3
        elif state == "block":
            header = int.from_bytes(head, "little")
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise FormatError("zstd block of the reserved type")
            self._skip = 1 if kind == 1 else size
            if header & 1:  # the frame's last block
                self._state, self._need = ("checksum", 4) if self._checksum else ("magic", 4)
        else:  # checksum
            self._state, self._need = "magic", 4
