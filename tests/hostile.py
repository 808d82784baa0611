"""Helpers for hostile-bundle tests: hand-made tar headers, running the real CLI.

``tests/factory.py`` writes bundles the way the builder does; the attacker does not.
Here a tar is assembled from raw 512-byte headers, so a test can put any typeflag,
magic, mode, size field or name (non-ASCII included) exactly where it wants, and
compress the result itself. ``run_apply`` drives ``gitops-apply`` in-process with a
frozen clock and returns (exit code, stderr lines).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from applier import _tar
from applier import cli as applier_cli
from applier.apply import Host

from factory import CREATED, BundleSpec, KeyPair, sign_bytes

Part = tuple[bytes, bytes]  # (512-byte header, member data)


def header(name: bytes | str, size: int, *, typeflag: bytes = b"0", mode: int = 0o644,
           linkname: bytes = b"", magic: bytes = b"ustar\x0000", prefix: bytes = b"",
           size_field: bytes | None = None) -> bytes:
    """One ustar header with a correct checksum, every field chosen by the caller."""
    raw = name.encode() if isinstance(name, str) else name
    b = bytearray(_tar.BLOCK)
    b[0:len(raw)] = raw
    b[100:108] = b"%07o\0" % mode
    b[108:116] = b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = size_field if size_field is not None else b"%011o\0" % size
    b[136:148] = b"%011o\0" % CREATED
    b[156:157] = typeflag
    b[157:157 + len(linkname)] = linkname
    b[257:265] = magic
    b[345:345 + len(prefix)] = prefix
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def member(name: bytes | str, data: bytes, **kw: object) -> Part:
    return header(name, len(data), **kw), data  # type: ignore[arg-type]


def assemble(parts: list[Part], end: bool = True) -> bytes:
    out = bytearray()
    for head, data in parts:
        out += head + data + _tar.padding(len(data))
    if end:
        out += _tar.end_of_archive(len(out))
    return bytes(out)


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    return data


def signed_parts(spec: BundleSpec, *keys: KeyPair, manifest: bytes | None = None,
                 signature: bytes | None = None) -> list[Part]:
    """The manifest and signature members, signed by ``keys`` (or as given)."""
    m = manifest if manifest is not None else spec.manifest().to_bytes()
    sig = signature if signature is not None else b"".join(sign_bytes(m, k) for k in keys)
    return [member("manifest.json", m), member("manifest.json.sig", sig)]


def payload_parts(spec: BundleSpec) -> list[Part]:
    return [member(n, d) for n, d in spec.members()]


def valid_parts(spec: BundleSpec, *keys: KeyPair) -> list[Part]:
    return signed_parts(spec, *keys) + payload_parts(spec)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Outcome:
    code: int
    lines: list[str]

    @property
    def line(self) -> str:
        return self.lines[0] if self.lines else ""


def frozen_host(monkeypatch: pytest.MonkeyPatch, now: int) -> None:
    """Make the CLI build its Host with a clock frozen at ``now``."""

    def make(root: Path, lock_wait: float = 0.0) -> Host:
        return Host(root, clock=lambda: now, lock_wait=lock_wait)

    monkeypatch.setattr(applier_cli, "Host", make)


def run_apply(capsys: pytest.CaptureFixture[str], root: Path, bundle: Path,
              *extra: str) -> Outcome:
    capsys.readouterr()
    code = applier_cli.main(["--root", str(root), "apply", str(bundle), *extra])
    err = capsys.readouterr().err
    return Outcome(code, err.splitlines())


class CountingReader:
    """Wraps the decompressed stream to count how many bytes the reader pulled."""

    def __init__(self, inner: object, counter: list[int]) -> None:
        self._inner = inner
        self._counter = counter

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._inner.read(n)  # type: ignore[attr-defined]
        self._counter[0] += len(data)
        return data


Builder = Callable[..., Path]
