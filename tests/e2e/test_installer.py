"""Installer: a wheelhouse made by the builder installs a working tool with no index.

Building the wheelhouse downloads the dependencies once (network to the package index
is allowed for that); the install itself runs ``pip install --no-index`` with pip's
configuration and ``PIP_*`` variables removed, so only the wheelhouse can serve it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from factory import KeyPair, write_allowed_signers

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stick") / "gitops-airgap"
    tool = shutil.which("gitops-bundle")
    assert tool is not None
    proc = subprocess.run([tool, "wheelhouse", str(out)], capture_output=True, text=True,
                          check=False, timeout=600)
    if proc.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot build the wheelhouse: {proc.stderr}")
        pytest.skip(f"cannot build the wheelhouse (no package index?): {proc.stderr[-300:]}")
    return out


def test_wheelhouse_holds_the_tool_its_dependencies_and_the_installer(wheelhouse: Path) -> None:
    names = {p.name.split("-")[0].lower() for p in wheelhouse.glob("*.whl")}
    assert {"gitops_airgap", "cryptography", "pyyaml", "click"} <= names
    assert os.access(wheelhouse / "install-from-usb", os.X_OK)
    assert (wheelhouse / "systemd" / "gitops-apply.service").is_file()
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=wheelhouse, check=True)


def install(wheelhouse: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(wheelhouse / "install-from-usb"), "--venv", str(tmp_path / "venv"),
         "--root", str(tmp_path / "root"), "--bin-dir", str(tmp_path / "bin"),
         "--unit-dir", str(tmp_path / "units"), "--udev-dir", str(tmp_path / "udev"),
         "--no-enable", *extra],
        capture_output=True, text=True, check=False, env=clean_env(), timeout=600)


def test_install_from_wheelhouse_without_an_index(
        wheelhouse: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    proc = install(wheelhouse, tmp_path, "--host", "frodo", "--allowed-signers", str(signers))
    assert proc.returncode == 0, proc.stderr
    tool = tmp_path / "venv" / "bin" / "gitops-apply"
    help_text = subprocess.run([str(tool), "--help"], capture_output=True, text=True,
                               check=True, env=clean_env()).stdout
    for command in ("apply", "drift", "watch", "status"):
        assert command in help_text
    status = subprocess.run([str(tmp_path / "bin" / "gitops-apply"), "--root",
                             str(tmp_path / "root"), "status"], capture_output=True,
                            text=True, check=True).stdout
    assert "host:     frodo" in status
    units = tmp_path / "units"
    service = (units / "gitops-drift.service").read_text()
    assert f"ExecStart={tool} " in service
    assert (tmp_path / "udev" / "99-gitops-usb.rules").is_file()
    if shutil.which("systemd-analyze"):
        names = sorted(p.name for p in units.iterdir())
        subprocess.run([require_tool("systemd-analyze"), "verify", "--man=no",
                        *(f"./{n}" for n in names)], cwd=units, check=True)
    # Running it again upgrades in place and keeps the config.
    again = install(wheelhouse, tmp_path, "--host", "frodo", "--allowed-signers", str(signers))
    assert again.returncode == 0, again.stderr
    assert "keeping it" in again.stderr


def test_installer_refuses_a_corrupted_wheelhouse(wheelhouse: Path, tmp_path: Path) -> None:
    copy = tmp_path / "stick"
    shutil.copytree(wheelhouse, copy)
    wheel = next(copy.glob("click-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    proc = install(copy, tmp_path)
    assert proc.returncode != 0
    assert "checksum mismatch" in proc.stderr
    assert not (tmp_path / "venv").exists()


def test_installer_refuses_a_wheel_the_sums_do_not_list(wheelhouse: Path, tmp_path: Path) -> None:
    """sha256sum -c checks only what SHA256SUMS lists, and pip takes the highest version
    it finds: a stray (or planted) newer wheel would be installed."""
    copy = tmp_path / "stick"
    shutil.copytree(wheelhouse, copy)
    ours = next(copy.glob("gitops_airgap-*.whl"))
    shutil.copy(ours, copy / "gitops_airgap-99.0-py3-none-any.whl")
    proc = install(copy, tmp_path)
    assert proc.returncode != 0
    assert "gitops_airgap-99.0-py3-none-any.whl is not listed in SHA256SUMS" in proc.stderr
    assert not (tmp_path / "venv").exists()
    (copy / "gitops_airgap-99.0-py3-none-any.whl").unlink()
    (copy / "SHA256SUMS").unlink()
    proc = install(copy, tmp_path)
    assert proc.returncode != 0
    assert "SHA256SUMS is missing" in proc.stderr


def test_installer_refuses_a_venv_path_a_unit_cannot_hold(
        wheelhouse: Path, tmp_path: Path) -> None:
    spaced = tmp_path / "with space"
    spaced.mkdir()
    proc = install(wheelhouse, spaced)
    assert proc.returncode != 0
    assert "cannot go into a systemd unit" in proc.stderr
    assert not (spaced / "venv").exists()
