"""Hostile bundles change nothing: one case per threat and per refusal of issue 3.

Every case starts from a host that already applied a genuine bundle (sequence 10),
so its root holds managed files *and* a populated state dir. The hostile bundle is
built by the factory or by hand (``hostile.py``), run through the real CLI
(``applier.cli.main``) with a frozen clock, and must: exit with the documented
code, print exactly one stderr line naming the cause, and leave every file, mode and
link under the root byte-for-byte as it was (``snapshot``), state dir included.
If a case were accepted it would be a real change (sequence 11, new content), so a
refusal is never confused with a no-op.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hostile import (
    CountingReader,
    Part,
    assemble,
    compress,
    frozen_host,
    header,
    member,
    payload_parts,
    run_apply,
    sha,
    signed_parts,
    valid_parts,
    write,
)

from applier import bundle as bundle_mod
from applier import cli as applier_cli
from applier.apply import init_host
from applier.bundle import MAX_MANIFEST_SIZE, MAX_SIGNATURE_SIZE
from applier.errors import ExitCode
from applier.manifest import canonical_json
from bundler.signing import load_signing_key, sign

from factory import CREATED, BundleSpec, FileSpec, KeyPair, snapshot, write_allowed_signers

NOW = CREATED + 3600
MOTD = "/etc/motd"
APP = "/opt/app/app.conf"
KIB = b"k" * 1024
BOMB = 50 << 20  # what a bomb expands to; the reader must stop long before
EARLY = 1 << 20  # "long before": at most this many decompressed bytes read
V = ExitCode.VERIFICATION
P = ExitCode.POLICY


def base_spec(seq: int, motd: bytes, **frodo_extra: bytes | FileSpec) -> BundleSpec:
    frodo: dict[str, bytes | FileSpec] = {MOTD: motd, APP: KIB, **frodo_extra}
    return BundleSpec({"frodo": frodo, "camelot": {MOTD: b"camelot\n"}}, sequence=seq,
                      commit=f"{seq:040x}")


@dataclass
class Ctx:
    """What a case builds from: the host, the keys and the hostile (sequence 11) spec."""

    tmp: Path
    root: Path
    key: KeyPair
    other: KeyPair
    new: BundleSpec

    def out(self, name: str = "hostile.tar") -> Path:
        return self.tmp / name

    def signed(self, manifest: bytes, *keys: KeyPair) -> Path:
        """A bundle whose manifest bytes are ``manifest``, signed by ``keys``."""
        parts = signed_parts(self.new, *keys, manifest=manifest) + payload_parts(self.new)
        return write(self.out(), assemble(parts))

    def raw(self, parts: list[Part], compression: str = "none", tail: bytes = b"",
            end: bool = True) -> Path:
        return write(self.out(), compress(assemble(parts, end) + tail, compression))

    def manifest_dict(self) -> dict[str, Any]:
        return self.new.manifest().to_dict()


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Ctx], Path]
    code: int
    match: str
    setup: Callable[[Ctx], None] | None = None
    early: bool = False  # a bomb: also check that reading stopped early


CASES: list[Case] = []


def case(id_: str, code: int, match: str, setup: Callable[[Ctx], None] | None = None,
         early: bool = False) -> Callable[[Callable[[Ctx], Path]], Callable[[Ctx], Path]]:
    def register(fn: Callable[[Ctx], Path]) -> Callable[[Ctx], Path]:
        CASES.append(Case(id_, fn, code, match, setup, early))
        return fn
    return register


def add(id_: str, code: int, match: str, build: Callable[[Ctx], Path],
        setup: Callable[[Ctx], None] | None = None, early: bool = False) -> None:
    CASES.append(Case(id_, build, code, match, setup, early))


def blob_name(data: bytes) -> str:
    return f"blobs/{sha(data)}"


def replace_member(c: Ctx, name: str, new: Part, compression: str = "none") -> Path:
    parts = valid_parts(c.new, c.key)
    idx = next(i for i, p in enumerate(parts) if p[0][:100].rstrip(b"\0") == name.encode())
    parts[idx] = new
    return c.raw(parts, compression)


def app_blob(c: Ctx) -> str:
    return blob_name(KIB)


# -- signatures and trust -------------------------------------------------------------

add("untrusted-key", V, r"0 of 1 required trusted signatures.*not in allowed_signers",
    lambda c: c.new.write(c.out(), c.other))
add("tampered-resigned-untrusted", V, r"not in allowed_signers",
    lambda c: c.new.replace(files={"frodo": {MOTD: b"owned\n"}}).write(c.out(), c.other))
add("trusted-and-untrusted-sig-over-tampered", V, r"bad signature",
    lambda c: c.new.write(c.out(), manifest_bytes=c.new.replace(subject="evil").manifest()
                          .to_bytes(), signature=_sig(c.new.manifest().to_bytes(), c.key)
                          + _sig(c.new.replace(subject="evil").manifest().to_bytes(), c.other)))
add("signature-over-other-bytes", V, r"bad signature",
    lambda c: c.new.write(c.out(), signature=_sig(b"some other manifest", c.key)))
add("signature-namespace-git", V, r"namespace 'git' is not 'gitops-bundle'",
    lambda c: c.new.write(c.out(), signature=_sig(c.new.manifest().to_bytes(), c.key,
                                                  namespace="git")))
add("signature-empty", V, r"manifest.json.sig: does not start with",
    lambda c: c.new.write(c.out(), signature=b""))
add("signature-garbage", V, r"manifest.json.sig: does not start with",
    lambda c: c.new.write(c.out(), signature=b"trust me\n"))


def _sig(data: bytes, key: KeyPair, namespace: str = "gitops-bundle") -> bytes:
    return sign(data, load_signing_key(key.private, None), namespace)


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


@case("flip-byte-manifest", V, r"bad signature")
def _flip_manifest(c: Ctx) -> Path:
    m = c.new.manifest().to_bytes()
    sig = _sig(m, c.key)
    return c.new.write(c.out(), manifest_bytes=_flip(m, len(m) // 2), signature=sig)


@case("flip-byte-signature", V, r"bad signature|not valid base64|malformed")
def _flip_sig(c: Ctx) -> Path:
    sig = _sig(c.new.manifest().to_bytes(), c.key)
    # A byte inside the base64 that encodes the Ed25519 signature itself.
    return c.new.write(c.out(), signature=_flip(sig, len(sig) - 60))


@case("flip-byte-blob", V, r"blobs/[0-9a-f]{64} has SHA-256 [0-9a-f]{64}, manifest says")
def _flip_blob(c: Ctx) -> Path:
    members = [(n, _flip(d, 3) if n == app_blob(c) else d) for n, d in c.new.members()]
    return c.new.write(c.out(), c.key, members=members)


@case("flip-byte-git-member", V, r"git/history.bundle has SHA-256")
def _flip_git(c: Ctx) -> Path:
    members = [(n, _flip(d, 0) if n.startswith("git/") else d) for n, d in c.new.members()]
    return c.new.write(c.out(), c.key, members=members)


@case("resigned-trusted-blob-swapped", V, r"has SHA-256 .*manifest says")
def _blob_swapped(c: Ctx) -> Path:
    # The trusted manifest names KIB; the member of that name holds other bytes.
    members = [(n, b"x" * 1024 if n == app_blob(c) else d) for n, d in c.new.members()]
    return c.new.write(c.out(), c.key, members=members)


@case("resigned-trusted-size-mismatch", V, r"is 1025 bytes, manifest says 1024")
def _size_mismatch(c: Ctx) -> Path:
    members = [(n, d + b"!" if n == app_blob(c) else d) for n, d in c.new.members()]
    return c.new.write(c.out(), c.key, members=members)


# -- the manifest (signed by a trusted key, so these reach the parser) ------------------


def _resigned(mutate: Callable[[dict[str, Any]], None]) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        d = c.manifest_dict()
        mutate(d)
        return c.signed(canonical_json(d), c.key)
    return build


add("manifest-unknown-format-version", V, r"unsupported format version 2",
    _resigned(lambda d: d.update(format=2)))
add("manifest-unknown-field", V, r"unknown field 'x_extra'",
    _resigned(lambda d: d.update(x_extra=1)))
add("manifest-unknown-file-field", V, r"unknown field 'setcap'",
    _resigned(lambda d: d["hosts"]["frodo"]["files"][0].update(setcap="cap_net_admin")))
add("manifest-float", V, r"non-integer number '11.0'",
    _resigned(lambda d: d.update(sequence=11.0)))
add("manifest-bool-as-int", V, r"sequence: must be an integer",
    _resigned(lambda d: d.update(sequence=True)))
add("manifest-path-not-normalised", V, r"is not normalised",
    _resigned(lambda d: d["hosts"]["frodo"]["files"][0].update(path="/etc/x/../shadow")))
# A signed manifest's numeric owner that chown(2) would read as "leave unchanged", or
# one no uid_t holds; a path a terminal would act on, or too long for PATH_MAX.
add("manifest-owner-is-uid-minus-one", V, r"owner: id 4294967295 is outside 0\.\.4294967294",
    _resigned(lambda d: d["hosts"]["frodo"]["files"][0].update(owner="4294967295")))
add("manifest-group-too-large", V, r"group: id 9999999999 is outside",
    _resigned(lambda d: d["hosts"]["frodo"]["files"][0].update(group="9999999999")))
def _path_with(char: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["hosts"]["frodo"]["files"][0].update(path=f"/etc/a{char}b.conf")


for _name, _char in (("c1-csi", "\x9b"), ("c1-nel", "\x85"), ("bidi-override", "\u202e"),
                     ("line-separator", "\u2028"), ("arabic-letter-mark", "\u061c")):
    add(f"manifest-path-{_name}", V, r"contains a control or bidirectional character",
        _resigned(_path_with(_char)))
add("manifest-path-over-3072-bytes", V, r"is longer than 3072 bytes",
    _resigned(lambda d: d["hosts"]["frodo"]["files"][0].update(
        path="/etc/" + "/".join(["\u00e9" * 120] * 14))))
add("manifest-noncanonical-whitespace", V, r"not in canonical form",
    lambda c: c.signed(c.new.manifest().to_bytes().replace(b'","', b'", "', 1), c.key))


@case("manifest-noncanonical-key-order", V, r"not in canonical form")
def _key_order(c: Ctx) -> Path:
    import json  # noqa: PLC0415 - only this case writes unsorted JSON

    d = c.manifest_dict()
    unsorted = json.dumps(dict(reversed(list(d.items()))), separators=(",", ":"))
    return c.signed(unsorted.encode(), c.key)


@case("manifest-duplicate-key", V, r"duplicate key 'builder'")
def _dup_key(c: Ctx) -> Path:
    m = c.new.manifest().to_bytes()
    assert m.startswith(b'{"builder":')
    return c.signed(b'{"builder":"evil",' + m[1:], c.key)


@case("manifest-not-utf8", V, r"not valid JSON")
def _not_utf8(c: Ctx) -> Path:
    return c.signed(c.new.manifest().to_bytes().replace(b"test change", b"test \xff\xfe"),
                    c.key)


@case("manifest-oversize", V, rf"manifest.json is {MAX_MANIFEST_SIZE + 1} bytes \(limit",
      early=True)
def _oversize_manifest(c: Ctx) -> Path:
    # Only the header: the reader must refuse on the declared size, before reading.
    return c.raw([(header("manifest.json", MAX_MANIFEST_SIZE + 1), b"")], "gzip",
                 tail=bytes(BOMB), end=False)


@case("signature-oversize", V, rf"manifest.json.sig is {MAX_SIGNATURE_SIZE + 1} bytes")
def _oversize_sig(c: Ctx) -> Path:
    m = c.new.manifest().to_bytes()
    return c.raw([member("manifest.json", m),
                  member("manifest.json.sig", b"\n" * (MAX_SIGNATURE_SIZE + 1))])


# -- tar structure ----------------------------------------------------------------------


def _typed(typeflag: bytes, linkname: bytes = b"") -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        return replace_member(c, app_blob(c), (header(app_blob(c), 0, typeflag=typeflag,
                                                      linkname=linkname), b""))
    return build


add("member-symlink", V, r"is a symbolic link: only regular files",
    _typed(b"2", b"/etc/shadow"))
add("member-hardlink", V, r"is a hard link: only regular files", _typed(b"1", b"etc/shadow"))
add("member-char-device", V, r"is a character device", _typed(b"3"))
add("member-block-device", V, r"is a block device", _typed(b"4"))
add("member-fifo", V, r"is a FIFO", _typed(b"6"))
add("member-directory", V, r"is a directory", _typed(b"5"))
add("member-contiguous", V, r"is a contiguous file", _typed(b"7"))
add("member-regular-with-link-target", V, r"carries a link target",
    lambda c: replace_member(c, app_blob(c), member(app_blob(c), KIB, linkname=b"/etc/shadow")))


def _named(name: bytes | str, prefix: bytes = b"") -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        return replace_member(c, app_blob(c), member(name, KIB, prefix=prefix))
    return build


_H = sha(KIB)
add("name-absolute", V, rf"member '/blobs/{_H}' is not named by the manifest",
    _named(f"/blobs/{_H}"))
add("name-dotdot", V, r"member '\.\./blobs/.*' is not named by the manifest",
    _named(f"../blobs/{_H}"))
add("name-inner-dotdot", V, r"member 'blobs/\.\./blobs/.*' is not named",
    _named(f"blobs/../blobs/{_H}"))
add("name-dot-segment", V, r"member 'blobs/\./.*' is not named by the manifest",
    _named(f"blobs/./{_H}"))
add("name-double-slash", V, r"member 'blobs//.*' is not named by the manifest",
    _named(f"blobs//{_H}"))
add("name-trailing-slash", V, r"member 'blobs/.*/' is not named by the manifest",
    _named(f"blobs/{_H}/"))
add("name-unicode-lookalike", V, r"non-ASCII name",
    _named(f"bl\u043ebs/{_H}".encode()))  # CYRILLIC SMALL LETTER O
add("name-fullwidth-solidus", V, r"non-ASCII name", _named(f"blobs\uff0f{_H}".encode()))
add("name-control-char", V, r"control or space character", _named(f"blobs/{_H}\n".encode()))
add("name-uppercase-digest", V, r"is not named by the manifest", _named(f"blobs/{_H.upper()}"))
add("name-prefix-field-escape", V, r"member '\.\./blobs/.*' is not named",
    _named(_H, prefix=b"../blobs"))


@case("member-duplicate", V, r"duplicate member 'blobs/")
def _duplicate(c: Ctx) -> Path:
    parts = valid_parts(c.new, c.key)
    return c.raw([*parts[:3], parts[2], *parts[3:]])


@case("member-duplicate-manifest", V, r"duplicate member 'manifest.json'")
def _duplicate_manifest(c: Ctx) -> Path:
    parts = valid_parts(c.new, c.key)
    return c.raw([*parts[:2], parts[0], *parts[2:]])


@case("member-not-in-manifest", V, r"member 'blobs/[0-9a-f]{64}' is not named by the manifest")
def _extra_member(c: Ctx) -> Path:
    return c.raw([*valid_parts(c.new, c.key), member(blob_name(b"evil"), b"evil")])


@case("member-extra-at-end", V, r"member 'evil.sh' is not named by the manifest")
def _extra_end(c: Ctx) -> Path:
    return c.raw([*valid_parts(c.new, c.key), member("evil.sh", b"#!/bin/sh\n")])


@case("manifest-entry-missing-from-tar", V, r"member git/history.bundle named by the manifest "
      r"is missing")
def _missing(c: Ctx) -> Path:
    return c.raw(valid_parts(c.new, c.key)[:-1])


@case("member-order-swapped", V, r"out of order")
def _swapped(c: Ctx) -> Path:
    parts = valid_parts(c.new, c.key)
    payload = parts[2:]
    payload[0], payload[1] = payload[1], payload[0]
    return c.raw(parts[:2] + payload)


@case("signature-before-manifest", V, r"first members must be manifest.json then "
      r"manifest.json.sig, found 'manifest.json.sig'")
def _sig_first(c: Ctx) -> Path:
    parts = valid_parts(c.new, c.key)
    return c.raw([parts[1], parts[0], *parts[2:]])


@case("pax-header-renames", V, r"is a PAX extended header")
def _pax_rename(c: Ctx) -> Path:
    record = f"path=blobs/{_H}\n"
    pax = f"{len(record) + 3 + len(str(len(record)))} {record}".encode()
    parts = valid_parts(c.new, c.key)
    return c.raw([*parts[:2], member("PaxHeader/x", pax, typeflag=b"x"), *parts[2:]])


@case("pax-header-resizes", V, r"is a PAX extended header")
def _pax_resize(c: Ctx) -> Path:
    pax = b"12 size=999\n"
    parts = valid_parts(c.new, c.key)
    return c.raw([*parts[:2], member("PaxHeader/x", pax, typeflag=b"x"), *parts[2:]])


@case("pax-global-header", V, r"is a PAX global header")
def _pax_global(c: Ctx) -> Path:
    return c.raw([member("pax_global_header", b"12 path=/x\n", typeflag=b"g"),
                  *valid_parts(c.new, c.key)])


@case("gnu-long-name", V, r"is a GNU long name")
def _gnu_long(c: Ctx) -> Path:
    parts = valid_parts(c.new, c.key)
    long = f"blobs/{_H}".encode() + b"\0"
    return c.raw([*parts[:2], member("././@LongLink", long, typeflag=b"L"), *parts[2:]])


@case("gnu-magic-header", V, r"is not POSIX ustar")
def _gnu_magic(c: Ctx) -> Path:
    return replace_member(c, app_blob(c), member(app_blob(c), KIB, magic=b"ustar  \0"))


@case("member-bad-checksum", V, r"has a bad checksum")
def _bad_checksum(c: Ctx) -> Path:
    head, data = member(app_blob(c), KIB)
    return replace_member(c, app_blob(c), (_flip(head, 130), data))


@case("member-base256-size", V, r"size is not an octal number")
def _base256(c: Ctx) -> Path:
    field = b"\x80" + bytes(7) + (1024).to_bytes(4, "big")
    return replace_member(c, app_blob(c), (header(app_blob(c), 0, size_field=field), KIB))


def _moded(mode: int) -> Callable[[Ctx], Path]:
    return lambda c: replace_member(c, app_blob(c), member(app_blob(c), KIB, mode=mode))


for _mode, _what in ((0o4644, "setuid"), (0o2644, "setgid"), (0o1644, "sticky")):
    add(f"member-mode-{_what}", V, rf"has setuid/setgid/sticky mode {_mode:o}", _moded(_mode))


@case("trailing-data-after-tar-end", V, r"trailing data after the tar end")
def _trailing(c: Ctx) -> Path:
    return c.raw(valid_parts(c.new, c.key), tail=b"#!/bin/sh\nrm -rf /\n".ljust(512, b"\0"))


@case("trailing-data-after-tar-end-gzip", V, r"trailing data after the tar end")
def _trailing_gz(c: Ctx) -> Path:
    return c.raw(valid_parts(c.new, c.key), "gzip", tail=b"\1" * 512)


@case("trailing-zero-padding-past-a-record", V, r"more than 10240 bytes of padding")
def _trailing_zeros(c: Ctx) -> Path:
    return c.raw(valid_parts(c.new, c.key), tail=bytes(20 * 1024))


@case("garbage-after-gzip-stream", V, r"corrupt or truncated compressed stream")
def _gzip_garbage(c: Ctx) -> Path:
    path = c.raw(valid_parts(c.new, c.key), "gzip")
    with path.open("ab") as f:
        f.write(b"PAYLOAD")
    return path


@case("nonzero-member-padding", V, r"non-zero padding after member")
def _padding(c: Ctx) -> Path:
    parts = valid_parts(c.new, c.key)
    body = bytearray(assemble(parts))
    # The motd blob is the shortest member: hide a byte in its padding.
    motd = b"motd v11\n"
    at = body.find(motd) + len(motd) + 5
    body[at] = 0x41
    return write(c.out(), bytes(body))


# -- truncation and corrupt compression -------------------------------------------------


def _truncated(compression: str, cut: Callable[[int, int], int]) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        parts = valid_parts(c.new, c.key)
        body = assemble(parts)
        data = compress(body, compression)
        return write(c.out(), data[:cut(len(data), len(assemble(parts, end=False)))])
    return build


_TRUNCATED = r"truncated|no manifest.json"
add("truncated-empty-file", V, r"error: /\S+\.tar: bundle is truncated at byte 0",
    _truncated("none", lambda n, e: 0))
add("truncated-in-first-header", V, _TRUNCATED, _truncated("none", lambda n, e: 300))
add("truncated-in-manifest", V, _TRUNCATED, _truncated("none", lambda n, e: 700))
add("truncated-in-payload", V, r"error: /\S+\.tar: bundle is truncated at byte \d+",
    _truncated("none", lambda n, e: e - 600))
add("truncated-in-end-marker", V, _TRUNCATED, _truncated("none", lambda n, e: e + 512))
add("truncated-gzip-half", V, r"corrupt or truncated compressed stream|truncated",
    _truncated("gzip", lambda n, e: n // 2))
add("truncated-gzip-trailer", V, r"corrupt or truncated compressed stream",
    _truncated("gzip", lambda n, e: n - 4))
add("truncated-gzip-header", V, r"corrupt or truncated compressed stream",
    _truncated("gzip", lambda n, e: 5))
add("truncated-zstd-half", V, r"truncated|corrupt zstd", _truncated("zstd", lambda n, e: n // 2))
# Every decompressed byte is there; only the frame's checksum is cut (zstandard's
# reader took that for a complete stream).
add("truncated-zstd-checksum", V, r"\.tar: zstd stream ends inside a frame \(truncated\)",
    _truncated("zstd", lambda n, e: n - 4))
add("truncated-zstd-checksum-byte", V, r"zstd stream ends inside a frame",
    _truncated("zstd", lambda n, e: n - 1))


def _skippable(where: str) -> Callable[[Ctx], Path]:
    """A zstd skippable frame: bytes every zstd reader ignores and no signature covers."""
    def build(c: Ctx) -> Path:
        data = compress(assemble(valid_parts(c.new, c.key)), "zstd")
        frame = b"\x50\x2a\x4d\x18" + (11).to_bytes(4, "little") + b"hidden data"
        return write(c.out(), frame + data if where == "before" else data + frame)
    return build


add("zstd-skippable-frame-after", V, r"zstd stream holds a skippable frame", _skippable("after"))
add("zstd-skippable-frame-before", V, r"tar header at byte 0",  # not zstd magic: a tar
    _skippable("before"), early=True)


# A flipped bit in the middle of a compressed stream can surface as any structural
# refusal, depending on which decompressed byte it lands on (the signing key, and so
# the stream, differs from run to run): any of them is a correct, clean refusal.
_ANY_CORRUPTION = (r"bad signature|corrupt|truncated|SHA-256|tar header|not named|out of order"
                   r"|padding|manifest says|only regular files|trailing data|end marker"
                   r"|expands past|non-ASCII|control or space|link target|setuid")


@case("corrupt-gzip-crc", V, r"corrupt or truncated compressed stream: CRC check failed")
def _corrupt_gzip_crc(c: Ctx) -> Path:
    data = compress(assemble(valid_parts(c.new, c.key)), "gzip")
    return write(c.out(), _flip(data, len(data) - 6))


@case("corrupt-gzip-deflate-data", V, _ANY_CORRUPTION)
def _corrupt_gzip(c: Ctx) -> Path:
    data = compress(assemble(valid_parts(c.new, c.key)), "gzip")
    return write(c.out(), _flip(data, len(data) // 2))


@case("corrupt-zstd-checksum", V, r"corrupt zstd stream")
def _corrupt_zstd_sum(c: Ctx) -> Path:
    data = compress(assemble(valid_parts(c.new, c.key)), "zstd")
    return write(c.out(), _flip(data, len(data) - 1))


@case("corrupt-zstd-data", V, _ANY_CORRUPTION)
def _corrupt_zstd(c: Ctx) -> Path:
    data = compress(assemble(valid_parts(c.new, c.key)), "zstd")
    return write(c.out(), _flip(data, len(data) // 2))


# -- decompression bombs: small on disk, 50 MiB expanded; must stop early --------------


@cache
def _zeros(compression: str) -> bytes:
    return compress(bytes(BOMB), compression)


@cache
def _ones(compression: str) -> bytes:
    return compress(b"\1" * BOMB, compression)


def _bomb(compression: str, kind: str) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        parts = valid_parts(c.new, c.key)
        if kind == "member":
            # The blob the manifest declares as 1 KiB claims 50 MiB in its header.
            idx = next(i for i, p in enumerate(parts) if p[1] == KIB)
            head = compress(assemble(parts[:idx], end=False)
                            + header(app_blob(c), BOMB), compression)
            return write(c.out(), head + _zeros(compression))
        body = compress(assemble(parts), compression)
        return write(c.out(), body + (_zeros(compression) if kind == "zeros"
                                      else _ones(compression)))
    return build


for _comp in ("gzip", "zstd"):
    add(f"bomb-{_comp}-member-declares-50MiB", V, r"is 52428800 bytes, manifest says 1024",
        _bomb(_comp, "member"), early=True)
    add(f"bomb-{_comp}-zeros-after-end", V, r"more than 10240 bytes of padding after the tar",
        _bomb(_comp, "zeros"), early=True)
    add(f"bomb-{_comp}-data-after-end", V, r"trailing data after the tar end",
        _bomb(_comp, "data"), early=True)


# -- host policy (genuine signature, wrong for this host) -------------------------------


def _config(**changes: Any) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        path = c.root / "etc/gitops-apply/config.yaml"
        data = yaml.safe_load(path.read_text())
        data.update(changes)
        path.write_text(yaml.safe_dump(data))
    return setup


def _symlink(at: str, target: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        link = c.root / at.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    return setup


def _with(path: str, data: bytes | FileSpec = b"evil\n") -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        frodo = dict(c.new.files["frodo"])
        frodo[path] = data
        return c.new.replace(files={**c.new.files, "frodo": frodo}).write(c.out(), c.key)
    return build


def _spec(**changes: Any) -> Callable[[Ctx], Path]:
    return lambda c: c.new.replace(**changes).write(c.out(), c.key)


add("expired", P, r"expired at .*tolerated skew 300s", _spec(expires=CREATED + 60))
add("expired-just-past-skew", P, r"expired at", _spec(expires=NOW - 301))
add("replay-older-sequence", P, r"sequence 9, not above 10 already applied",
    _spec(sequence=9, commit="9" * 40))
add("replay-equal-sequence", P, r"sequence 10, not above 10 already applied",
    _spec(sequence=10, commit="a" * 40))
add("bundle-without-this-host", P, r"has no files for host 'frodo' \(it is for: camelot\)",
    _spec(files={"camelot": {MOTD: b"c\n"}}))
add("manifest-setuid-host-disallows", P, r"/opt/app/tool: mode 4755 has setuid",
    _with("/opt/app/tool", FileSpec(b"\x7fELF", mode=0o4755)))
add("manifest-setgid-host-disallows", P, r"mode 2755 has setuid/setgid/sticky",
    _with("/opt/app/tool", FileSpec(b"\x7fELF", mode=0o2755)))
add("etc-shadow-when-etc-excluded", P, r"/etc/shadow: outside this host's allowed prefixes "
    r"\(/etc/motd, /etc/nginx, /opt\)", _with("/etc/shadow"),
    setup=_config(allowed_prefixes=["/etc/motd", "/etc/nginx", "/opt"]))
add("root-authorized-keys", P, r"/root/.ssh/authorized_keys: outside this host's allowed",
    _with("/root/.ssh/authorized_keys", b"ssh-ed25519 AAAA mallory\n"))
add("usr-bin", P, r"/usr/bin/x: outside this host's allowed prefixes", _with("/usr/bin/x"))
add("own-config-dir", P, r"/etc/gitops-apply/allowed_signers: the tool's own config and state",
    _with("/etc/gitops-apply/allowed_signers", b"mallory ssh-ed25519 AAAA\n"))
add("own-state-dir", P, r"/var/lib/gitops-apply/current.json: the tool's own config",
    _with("/var/lib/gitops-apply/current.json", b"{}"))
add("symlink-dir-leads-outside", P, r"/opt/bin/sh: outside this host's allowed prefixes .* "
    r"\(through a symlink to /usr/bin/sh\)", _with("/opt/bin/sh"),
    setup=_symlink("/opt/bin", "/usr/bin"))
add("relative-symlink-climbs-out", P, r"through a symlink to /root/.ssh/authorized_keys",
    _with("/srv/www/up/authorized_keys"), setup=_symlink("/srv/www/up", "../../../root/.ssh"))
add("symlink-into-own-state", P, r"the tool's own config and state are not writable by "
    r"bundles \(through a symlink to /var/lib/gitops-apply/current.json\)",
    _with("/srv/state/current.json"), setup=_symlink("/srv/state", "/var/lib/gitops-apply"))
# A file where a directory holding the tool's config or state is.
add("file-over-etc", P, r"^gitops-apply: error: /etc: holds the tool's own config and state",
    _spec(files={"frodo": {"/etc": b"evil\n"}}))
add("file-over-var-lib", P, r"/var/lib: holds the tool's own config and state "
    r"\(/var/lib/gitops-apply\)", _with("/var/lib"))


def _var_lib_on_srv(c: Ctx) -> None:
    """A host whose /var/lib lives on /srv (a symlink), so /srv/varlib/gitops-apply is
    the state directory by another name, under an allowed prefix."""
    (c.root / "srv").mkdir(exist_ok=True)
    (c.root / "var/lib").rename(c.root / "srv/varlib")
    (c.root / "var/lib").symlink_to("../srv/varlib")


add("own-state-by-another-name", P, r"/srv/varlib/gitops-apply/config.cache.json: the "
    r"tool's own config and state are not writable by bundles \(/srv/varlib/gitops-apply "
    r"is the same directory\)", _with("/srv/varlib/gitops-apply/config.cache.json", b"{}"),
    setup=_var_lib_on_srv)
add("inside-own-state-by-another-name", P, r"\(/srv/varlib/gitops-apply/bundles/x is the "
    r"same directory\)|\(/srv/varlib/gitops-apply is the same directory\)",
    _with("/srv/varlib/gitops-apply/bundles/x/meta.json", b"{}"), setup=_var_lib_on_srv)


# -- the test -----------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path, signing_key: KeyPair, other_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Ctx:
    """A host named frodo that trusts signing_key and already applied sequence 10."""
    root = tmp_path / "frodo"
    init_host(root, "frodo", write_allowed_signers(tmp_path / "allowed_signers", signing_key))
    frozen_host(monkeypatch, NOW)
    first = base_spec(10, b"motd v10\n").write(tmp_path / "v10.tar", signing_key)
    ok = run_apply(capsys, root, first)
    assert ok.code == 0, ok.lines
    return Ctx(tmp_path, root, signing_key, other_key, base_spec(11, b"motd v11\n"))


@contextlib.contextmanager
def counting_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    counter = [0]
    real = bundle_mod._decompressed

    @contextlib.contextmanager
    def wrapped(raw: Any, path: Path, *rest: Any) -> Iterator[Any]:
        with real(raw, path, *rest) as stream:
            yield CountingReader(stream, counter)

    monkeypatch.setattr(bundle_mod, "_decompressed", wrapped)
    yield counter


def test_there_are_enough_distinct_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


def test_control_the_sequence_11_bundle_applies(
        ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    """Without tampering the hostile cases' base bundle is a real change: it applies."""
    out = run_apply(capsys, ctx.root, ctx.new.write(ctx.out(), ctx.key))
    assert out.code == 0, out.lines
    assert (ctx.root / "etc/motd").read_bytes() == b"motd v11\n"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_bundle_is_refused_and_changes_nothing(
        case: Case, ctx: Ctx, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    if case.setup is not None:
        case.setup(ctx)
    bundle = case.build(ctx)
    before = snapshot(ctx.root)
    with counting_reads(monkeypatch) as read:
        out = run_apply(capsys, ctx.root, bundle)
    assert out.code == case.code, out.lines
    assert len(out.lines) == 1, out.lines
    assert out.line.startswith("gitops-apply: error: ")
    assert re.search(case.match, out.line), out.line
    assert "Traceback" not in out.line
    assert snapshot(ctx.root) == before
    if case.early:
        assert read[0] < EARLY, f"read {read[0]} decompressed bytes before refusing"
    # `verify` refuses it the same way, and changes nothing either.
    capsys.readouterr()
    assert applier_cli.main(["--root", str(ctx.root), "verify", str(bundle)]) == case.code
    assert snapshot(ctx.root) == before


def test_bundle_that_is_a_fifo_does_not_wedge_the_host(
        ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    """A FIFO on the stick must be refused, not block apply (holding the lock) forever."""
    fifo = ctx.tmp / "stick.tar"
    os.mkfifo(fifo)
    before = snapshot(ctx.root)

    def timeout(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("apply blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    try:
        out = run_apply(capsys, ctx.root, fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert out.code == V, out.lines
    assert len(out.lines) == 1
    assert "not a regular file" in out.line
    assert snapshot(ctx.root) == before
