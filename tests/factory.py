"""A bundle factory for tests: the other side of the air gap, simulated.

Builds signed format-1 bundles straight from a {host: {path: bytes}} mapping (no git
needed), with the real signing code, so tests can make valid bundles fast, then tamper
with any part (manifest, signature, members, tar structure) and re-sign with trusted
or untrusted keys. Real ``ssh-keygen`` makes the keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from applier.manifest import (
    GIT_BUNDLE_NAME,
    Command,
    FileEntry,
    GitInfo,
    HostEntry,
    Manifest,
    Source,
    make_bundle_id,
)
from bundler.signing import load_signing_key, sign
from bundler.writer import Member, write_tar

FAKE_GIT = b"# v2 git bundle\nfake history for tests\n"
CREATED = 1_790_000_000  # 2026-09-21


@dataclass(frozen=True)
class KeyPair:
    name: str
    private: Path
    public_line: str

    def signers_line(self, principal: str | None = None) -> str:
        return f"{principal or self.name} {self.public_line}\n"


def make_key(directory: Path, name: str, passphrase: str = "") -> KeyPair:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", name,
                    "-f", str(path)], check=True)
    return KeyPair(name, path, (directory / f"{name}.pub").read_text().strip())


def write_allowed_signers(path: Path, *keys: KeyPair) -> Path:
    path.write_text("".join(k.signers_line() for k in keys))
    return path


def sign_bytes(data: bytes, key: KeyPair) -> bytes:
    return sign(data, load_signing_key(key.private, None))


@dataclass
class FileSpec:
    content: bytes
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    validate: tuple[str | Command, ...] = ()
    check: tuple[str | Command, ...] = ()
    on_change: tuple[str | Command, ...] = ()
    health: tuple[str | Command, ...] = ()
    drift: str = "revert"


def _commands(cmds: tuple[str | Command, ...]) -> tuple[Command, ...]:
    """A plain string is a command with the default timeout and no retries."""
    return tuple(Command(c) if isinstance(c, str) else c for c in cmds)


Files = Mapping[str, Mapping[str, bytes | FileSpec]]


@dataclass
class BundleSpec:
    """Everything that goes into a bundle; change fields, then ``write``."""

    files: Files
    sequence: int = 1
    created: int = CREATED
    expires: int | None = None
    commit: str = "c" * 40
    subject: str = "test change"
    extra_blobs: dict[str, bytes] = field(default_factory=dict)

    def manifest(self) -> Manifest:
        hosts: dict[str, HostEntry] = {}
        for host, files in self.files.items():
            entries = []
            for path, spec in sorted(files.items()):
                s = spec if isinstance(spec, FileSpec) else FileSpec(spec)
                entries.append(FileEntry(
                    path=path, sha256=hashlib.sha256(s.content).hexdigest(),
                    size=len(s.content), mode=s.mode, owner=s.owner, group=s.group,
                    validate=_commands(s.validate),
                    check=_commands(s.check),
                    on_change=_commands(s.on_change),
                    health=_commands(s.health),
                    drift=s.drift,  # type: ignore[arg-type]
                ))
            hosts[host] = HostEntry(tuple(entries))
        commit = self.commit
        return Manifest(
            bundle_id=make_bundle_id(self.sequence, commit), sequence=self.sequence,
            created=self.created, expires=self.expires,
            source=Source("infra", commit, "d" * 40, "main", "Ada Ops <ada@example.org>",
                          self.subject),
            builder="tests", hosts=hosts,
            git=GitInfo(hashlib.sha256(FAKE_GIT).hexdigest(), len(FAKE_GIT),
                        {"refs/heads/main": commit}),
        )

    def contents(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for files in self.files.values():
            for spec in files.values():
                data = spec.content if isinstance(spec, FileSpec) else spec
                out[hashlib.sha256(data).hexdigest()] = data
        out.update(self.extra_blobs)
        return out

    def members(self) -> list[tuple[str, bytes]]:
        """(name, data) of every payload member, in format order."""
        contents = self.contents()
        m = self.manifest()
        return [(name, contents[digest] if name != GIT_BUNDLE_NAME else FAKE_GIT)
                for name, digest, _ in m.members()]

    def write(self, out: Path, *keys: KeyPair, compression: str = "none",
              manifest_bytes: bytes | None = None, signature: bytes | None = None,
              members: list[tuple[str, bytes]] | None = None) -> Path:
        """Sign (by every key given) and write; any part may be overridden to tamper."""
        data = manifest_bytes if manifest_bytes is not None else self.manifest().to_bytes()
        sig = signature if signature is not None else b"".join(sign_bytes(data, k)
                                                              for k in keys)
        payload = members if members is not None else self.members()
        write_tar(out, data, sig,
                  [Member(n, len(d), (lambda d=d: [d])) for n, d in payload],  # type: ignore[misc]
                  mtime=self.created, compression=compression)
        return out

    def replace(self, **changes: Any) -> BundleSpec:
        return replace(self, **changes)


def raw_tar(out: Path, members: Iterable[tuple[str, bytes]],
            tweak: Callable[[tarfile.TarInfo], None] | None = None,
            fmt: int = tarfile.USTAR_FORMAT) -> Path:
    """A tar written by Python's tarfile, for structures our writer refuses to make."""
    with tarfile.open(out, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            if tweak is not None:
                tweak(info)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under root: (mode, uid, gid, content hash or link target)."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                what = "-> " + os.readlink(p)
            elif p.is_file():
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = "dir"
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, what)
    return out


# Runs one gitops-apply command in a fresh interpreter, then writes sys.modules to the
# file argv[1]: what a command imports is part of its start-up cost (test_startup.py).
PROBE = """\
import json, sys
from applier.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def loaded(tmp_path: Path, root: Path, *args: str) -> set[str]:
    """The modules ``gitops-apply --root ROOT ARGS`` loads, run in a fresh interpreter."""
    out = tmp_path / "modules.json"
    subprocess.run([sys.executable, "-c", PROBE, str(out), "--root", str(root), *args],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["code"] == 0
    return set(result["modules"])
