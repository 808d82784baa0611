"""Drift: managed files changed outside Git are found, reported, saved and reverted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from applier import drift
from applier.apply import Host
from applier.cli import main
from applier.errors import ExitCode, ValidationFailedError

from conftest import Systemctl
from factory import BundleSpec, FileSpec, KeyPair, snapshot

NGINX = "/etc/nginx/nginx.conf"
SITE = "/etc/nginx/conf.d/app.conf"
MOTD = "/etc/motd"
HOSTS = "/etc/hosts.allow"
CACHE = "/etc/app/cache.json"

NGINX_CONF = b"events {}\nhttp {\n  include conf.d/*.conf;\n}\n"
SITE_CONF = b"server { listen 8080; }\n"


def spec(seq: int = 1, over: dict[str, FileSpec] | None = None) -> BundleSpec:
    files: dict[str, bytes | FileSpec] = {
        NGINX: FileSpec(NGINX_CONF, on_change=("systemctl reload nginx",)),
        SITE: FileSpec(SITE_CONF, on_change=("systemctl reload nginx",)),
        MOTD: FileSpec(b"welcome to frodo\n", mode=0o640, on_change=("systemctl restart motd",)),
        HOSTS: FileSpec(b"sshd: 10.0.0.0/8\n", drift="report",
                        on_change=("systemctl reload sshd",)),
        CACHE: FileSpec(b"{}\n", drift="ignore"),
        **(over or {}),
    }
    return BundleSpec({"frodo": files}, sequence=seq, commit=f"{seq:040x}")


def disk(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


@pytest.fixture
def applied(root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> Host:
    host = Host(root)
    host.apply(spec().write(tmp_path / "b1.tar", signing_key))
    systemctl.clear()
    return host


def tamper(root: Path) -> None:
    """One of each kind of out-of-band change."""
    disk(root, SITE).write_bytes(b"server { listen 9999; }\n")       # content
    os.chmod(disk(root, MOTD), 0o600)                                 # mode
    disk(root, NGINX).unlink()                                        # missing
    disk(root, HOSTS).unlink()                                        # symlink (report)
    disk(root, HOSTS).symlink_to("/tmp/evil")
    disk(root, CACHE).write_bytes(b'{"warm": true}\n')                # ignored


def test_clean_host_has_no_drift(applied: Host) -> None:
    report = drift.check(applied)
    assert report.drifted == []
    assert report.checked == 4
    assert report.ignored == [CACHE]


def test_each_kind_is_reported_with_policy(applied: Host, root: Path) -> None:
    tamper(root)
    before = snapshot(root / "etc")
    report = drift.check(applied)
    kinds = {d.path: (d.kind, d.policy) for d in report.drifted}
    assert kinds == {SITE: ("content", "revert"), MOTD: ("mode", "revert"),
                     NGINX: ("missing", "revert"), HOSTS: ("symlink", "report")}
    site = next(d for d in report.drifted if d.path == SITE)
    assert site.diff is not None
    assert "-server { listen 8080; }" in site.diff
    assert "+server { listen 9999; }" in site.diff
    motd = next(d for d in report.drifted if d.path == MOTD)
    assert "mode 0600, expected 0640" in motd.reason
    # A check changes nothing.
    assert snapshot(root / "etc") == before


def test_replaced_by_directory(applied: Host, root: Path) -> None:
    disk(root, SITE).unlink()
    disk(root, SITE).mkdir()
    (disk(root, SITE) / "inner").write_text("x")
    [d] = drift.check(applied).drifted
    assert (d.path, d.kind) == (SITE, "directory")
    report = drift.fix(applied)
    assert disk(root, SITE).read_bytes() == SITE_CONF
    [saved] = drift.history(applied.layout)
    assert saved.id == report.saved
    assert saved.files[0]["kind"] == "directory"
    out = applied.layout.root.parent / "restored"
    drift.restore(applied.layout, saved.id, out)
    assert (out / SITE.lstrip("/") / "inner").read_text() == "x"


def test_fix_restores_runs_only_affected_on_change_and_saves(
        applied: Host, root: Path, systemctl: Systemctl) -> None:
    unmanaged = disk(root, "/etc/nginx/conf.d/local.conf")
    unmanaged.write_bytes(b"# mine\n")
    tamper(root)
    report = drift.fix(applied)
    assert sorted(report.fixed) == sorted([SITE, MOTD, NGINX])
    assert disk(root, SITE).read_bytes() == SITE_CONF
    assert disk(root, NGINX).read_bytes() == NGINX_CONF
    assert disk(root, MOTD).stat().st_mode & 0o7777 == 0o640
    # report-policy path: still a symlink; ignore-policy path: untouched.
    assert disk(root, HOSTS).is_symlink()
    assert disk(root, CACHE).read_bytes() == b'{"warm": true}\n'
    assert unmanaged.read_bytes() == b"# mine\n"
    # nginx once for both of its files, motd's restart; never sshd (report only).
    assert sorted(systemctl.calls()) == ["systemctl reload nginx", "systemctl restart motd"]
    assert [d.path for d in report.remaining] == [HOSTS]
    # The overwritten versions were saved and can be written back out.
    [saved] = drift.history(applied.layout)
    by_path = {f["path"]: f for f in saved.files}
    assert set(by_path) == {SITE, MOTD, NGINX}
    assert by_path[NGINX]["kind"] == "missing"
    assert by_path[MOTD]["mode"] == "0600"
    out = root.parent / "review"
    _, written = drift.restore(applied.layout, saved.id[:12], out)
    assert (out / SITE.lstrip("/")).read_bytes() == b"server { listen 9999; }\n"
    assert (out / MOTD.lstrip("/")).stat().st_mode & 0o777 == 0o600
    assert len(written) == 2  # the missing file has nothing to restore
    # Audit: who/what/when.
    [rec] = [r for r in applied.history() if r["event"] == "drift-fix"]
    assert rec["result"] == "ok"
    assert rec["saved"] == saved.id
    assert rec["by"]["uid"] == os.getuid()
    assert sorted(rec["updated"] + rec["added"]) == sorted([SITE, MOTD, NGINX])
    # A second check: only the report-only file remains.
    assert [d.path for d in drift.check(applied).drifted] == [HOSTS]


def test_fix_of_a_clean_host_does_nothing(applied: Host, systemctl: Systemctl) -> None:
    report = drift.fix(applied)
    assert report.fixed == []
    assert report.saved is None
    assert systemctl.calls() == []
    assert drift.history(applied.layout) == []


def test_host_override_beats_manifest_policy(applied: Host, root: Path) -> None:
    cfg = yaml.safe_load(applied.layout.config_file.read_text())
    cfg["drift"] = {"/etc/nginx": "report", MOTD: "ignore"}
    applied.layout.config_file.write_text(yaml.safe_dump(cfg))
    host = Host(root)
    tamper(root)
    report = drift.fix(host)
    assert report.fixed == []
    assert {d.path: d.policy for d in report.drifted} == {SITE: "report", NGINX: "report",
                                                          HOSTS: "report"}
    assert not disk(root, NGINX).exists()
    assert disk(root, MOTD).stat().st_mode & 0o777 == 0o600


def test_check_failure_during_fix_keeps_drift_and_saved_copy(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    marker = tmp_path / "broken"
    check = f"sh -c 'test ! -e {marker}'"
    host = Host(root)
    host.apply(spec(over={SITE: FileSpec(SITE_CONF, check=(check,))}).write(
        tmp_path / "b.tar", signing_key))
    disk(root, SITE).write_bytes(b"edited\n")
    marker.touch()
    with pytest.raises(ValidationFailedError):
        drift.fix(host)
    assert disk(root, SITE).read_bytes() == b"edited\n"
    assert len(drift.history(host.layout)) == 1
    [rec] = [r for r in host.history() if r["event"] == "drift-fix"]
    assert rec["result"].startswith("failed")


# -- the command line ---------------------------------------------------------------------


def run(root: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--root", str(root), *args])
    return code, capsys.readouterr().out


def test_cli_exit_codes_json_and_restore(
        applied: Host, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        systemctl: Systemctl) -> None:
    assert run(root, "drift", capsys=capsys)[0] == ExitCode.OK
    tamper(root)
    code, out = run(root, "drift", capsys=capsys)
    assert code == ExitCode.DRIFT
    assert "content" in out
    assert "+server { listen 9999; }" in out
    code, out = run(root, "drift", "--no-diff", capsys=capsys)
    assert "+server" not in out
    code, out = run(root, "drift", "--json", capsys=capsys)
    data = json.loads(out)
    assert code == ExitCode.DRIFT
    assert {d["path"]: d["kind"] for d in data["drifted"]}[NGINX] == "missing"
    # --fix leaves the report-only file drifted: still exit 8.
    code, out = run(root, "drift", "--fix", capsys=capsys)
    assert code == ExitCode.DRIFT
    assert "saved the overwritten versions as" in out
    disk(root, HOSTS).unlink()
    disk(root, HOSTS).write_bytes(b"sshd: 10.0.0.0/8\n")
    os.chmod(disk(root, HOSTS), 0o644)
    assert run(root, "drift", "--fix", capsys=capsys)[0] == ExitCode.OK
    code, out = run(root, "drift", "--history", "--json", capsys=capsys)
    [saved] = json.loads(out)
    dest = tmp_path / "out"
    code, out = run(root, "drift", "--restore", saved["id"], "--to", str(dest), "--path", SITE,
                    capsys=capsys)
    assert code == ExitCode.OK
    assert (dest / SITE.lstrip("/")).read_bytes() == b"server { listen 9999; }\n"
    # Never overwrites.
    code, _ = run(root, "drift", "--restore", saved["id"], "--to", str(dest), capsys=capsys)
    assert code == ExitCode.IO
    assert run(root, "drift", "--fix", "--history", capsys=capsys)[0] == ExitCode.USAGE
    status = json.loads(run(root, "status", "--json", capsys=capsys)[1])
    assert status["drift"]["drifted"] == 0
    assert status["drift"]["saved_sets"] == 1


def test_no_bundle_yet(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(root, "drift", capsys=capsys)
    assert code == ExitCode.OK
    assert "no bundle applied yet" in out
