"""The shipped systemd units and udev rule: ``systemd-analyze verify`` accepts them all."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from conftest import REPO_ROOT, require_tool

UNITS = REPO_ROOT / "scripts" / "systemd"
DEFAULT_BIN = "/opt/gitops-apply/venv/bin/gitops-apply"
NAMES = ["gitops-apply.path", "gitops-apply.service", "gitops-drift.service",
         "gitops-drift.timer", "media-gitops.mount"]


def installed_copy(tmp_path: Path) -> Path:
    """The units as the installer writes them: ExecStart pointing at a real binary."""
    binary = shutil.which("gitops-apply")
    assert binary is not None, "the package's console script is not on PATH"
    out = tmp_path / "units"
    out.mkdir()
    for name in NAMES:
        text = (UNITS / name).read_text()
        (out / name).write_text(text.replace(DEFAULT_BIN, binary))
    return out


def test_every_unit_is_shipped() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted([*NAMES, "99-gitops-usb.rules"])


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    units = installed_copy(tmp_path)
    proc = subprocess.run([analyze, "verify", "--man=no", *(f"./{n}" for n in NAMES)],
                          cwd=units, capture_output=True, text=True, check=False)
    ours = [line for line in proc.stderr.splitlines() if any(n in line for n in NAMES)]
    assert proc.returncode == 0, proc.stderr
    assert ours == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a missing binary fails it."""
    analyze = require_tool("systemd-analyze")
    units = installed_copy(tmp_path)
    svc = units / "gitops-drift.service"
    svc.write_text(re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/gitops-apply",
                          svc.read_text()))
    proc = subprocess.run([analyze, "verify", "--man=no", "./gitops-drift.service"],
                          cwd=units, capture_output=True, text=True, check=False)
    assert proc.returncode != 0


def test_mount_unit_name_matches_where_and_udev_rule() -> None:
    escape = require_tool("systemd-escape")
    mount = (UNITS / "media-gitops.mount").read_text()
    where = re.search(r"^Where=(\S+)$", mount, re.MULTILINE)
    assert where is not None
    name = subprocess.run([escape, "--path", "--suffix=mount", where.group(1)],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert name == "media-gitops.mount"
    service = (UNITS / "gitops-apply.service").read_text()
    assert f"WantedBy={name}" in service
    assert where.group(1) in service  # the watcher looks where the stick is mounted
    rules = [line for line in (UNITS / "99-gitops-usb.rules").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(rules) == 1
    pairs = [p.strip() for p in rules[0].split(",")]
    assert all(re.fullmatch(r'[A-Z_]+(\{[A-Za-z_]+\})?(==|\+=|=)"[^"]*"', p) for p in pairs), pairs
    assert f'ENV{{SYSTEMD_WANTS}}+="{name}"' in pairs
    assert 'ENV{ID_FS_LABEL}=="GITOPS"' in pairs


def test_watch_and_drift_commands_in_units_parse(tmp_path: Path) -> None:
    """Each ExecStart is a valid gitops-apply command line (checked with --help)."""
    binary = shutil.which("gitops-apply")
    assert binary is not None
    for name in ("gitops-apply.service", "gitops-drift.service"):
        line = re.search(r"^ExecStart=(.+)$", (UNITS / name).read_text(), re.MULTILINE)
        assert line is not None
        argv = line.group(1).split()
        assert argv[0] == DEFAULT_BIN
        proc = subprocess.run([binary, "--root", str(tmp_path), *argv[1:], "--help"],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
