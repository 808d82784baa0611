"""A full filesystem while staging: the host stays as it was, the message says how much.

The whole host root lives on a 1 MiB tmpfs that the test mounts (``small_fs`` in
conftest.py: root only; skipped elsewhere, failed in CI where the tests run as root).
Two ways to run out: a file larger than the free space (refused before staging the
blobs), and one that fits once but not twice, so streaming it into the state dir
succeeds and the temp copy beside its target would not (refused before the journal,
by the transaction's own check).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from applier.apply import init_host
from applier.errors import ExitCode

from conftest import free_bytes
from factory import BundleSpec, FileSpec, KeyPair, snapshot, write_allowed_signers


@pytest.fixture
def root(small_fs: Path, tmp_path: Path, signing_key: KeyPair) -> Path:
    root = small_fs / "host"
    init_host(root, "frodo", write_allowed_signers(tmp_path / "allowed_signers", signing_key))
    v1 = BundleSpec({"frodo": {"/etc/app.conf": b"v1\n", "/etc/motd": b"hello\n"}},
                    sequence=1, commit="1" * 40).write(tmp_path / "v1.tar", signing_key)
    assert apply(root, v1).returncode == 0
    return root


def apply(root: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gitops-apply", "--root", str(root), "apply", str(bundle)],
                          capture_output=True, text=True, check=False)


def big_bundle(tmp_path: Path, key: KeyPair, size: int) -> Path:
    # Incompressible, so no filesystem trick makes it smaller.
    blob = os.urandom(size)
    return BundleSpec({"frodo": {"/etc/app.conf": b"v2\n", "/srv/data/big.bin": blob}},
                      sequence=2, commit="2" * 40).write(tmp_path / "big.tar", key)


@pytest.mark.parametrize("fraction", [pytest.param(2.0, id="larger-than-free-space"),
                                      pytest.param(0.7, id="fits-once-not-twice")])
def test_full_filesystem_while_staging_changes_nothing(
        root: Path, tmp_path: Path, signing_key: KeyPair, fraction: float) -> None:
    size = int(free_bytes(root) * fraction)
    bundle = big_bundle(tmp_path, signing_key, size)
    before = snapshot(root)
    r = apply(root, bundle)
    assert r.returncode == ExitCode.IO, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    need = re.search(r"need (\d+) bytes, (\d+) free", lines[0])
    assert need is not None, lines[0]
    assert int(need.group(1)) >= size > int(need.group(2))
    assert snapshot(root) == before
    # Nothing half-done is left for later either.
    status = subprocess.run(["gitops-apply", "--root", str(root), "status", "--json"],
                            capture_output=True, text=True, check=True)
    assert '"transaction_pending": false' in status.stdout
    assert snapshot(root) == before


def test_disk_fills_while_streaming_blobs_changes_nothing(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """The byte count fits, the blocks do not: each 4097-byte blob takes two pages, so
    the free-space check passes and a write fails part-way through the bundle."""
    pages = free_bytes(root) // 4096
    blobs = {f"/srv/data/{i:03}.bin": os.urandom(4097) for i in range(pages // 2 + 2)}
    bundle = BundleSpec({"frodo": blobs}, sequence=2, commit="2" * 40).write(
        tmp_path / "many.tar", signing_key)
    before = snapshot(root)
    r = apply(root, bundle)
    assert r.returncode == ExitCode.IO, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "no space left on device" in lines[0]
    assert re.search(r"needs? \d+ bytes", lines[0]), lines[0]
    assert snapshot(root) == before


def test_disk_full_when_a_failed_health_check_is_recorded_still_rolls_back(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """The health check fails *and* fills the disk: the bundle cannot be remembered as
    bad nor audited, but its files are rolled back all the same and the exit code is
    the health failure's (a warning says what could not be recorded)."""
    fill = "sh -c 'head -c 4000000 /dev/zero > {root}/filler; exit 1'"
    bundle = BundleSpec({"frodo": {"/etc/app.conf": FileSpec(b"v2\n", health=(fill,)),
                                   "/etc/motd": b"hello\n"}},
                        sequence=2, commit="2" * 40).write(tmp_path / "v2.tar", signing_key)
    before = snapshot(root / "etc")
    r = apply(root, bundle)
    (root / "filler").unlink()
    assert r.returncode == ExitCode.HEALTH, r.stderr
    assert "no space left on device" in r.stderr
    assert snapshot(root / "etc") == before
    assert not (root / "var/lib/gitops-apply/journal.json").exists()
