"""Applying, re-applying and rolling back bundles on a host under a temporary root."""

from __future__ import annotations

import grp
import json
import os
import pwd
import time
from pathlib import Path

import pytest

from applier.apply import Host, init_host
from applier.errors import (
    ExitCode,
    HostNotInBundleError,
    NoRollbackTargetError,
    ReplayError,
    StateError,
    ValidationFailedError,
)

from conftest import Systemctl
from factory import BundleSpec, FileSpec, KeyPair, snapshot, write_allowed_signers

NGINX = "/etc/nginx/nginx.conf"
SITE = "/etc/nginx/conf.d/app.conf"
MOTD = "/etc/motd"


def spec(seq: int, site: bytes = b"server { listen 8080; }\n", extra: bool = True,
         ) -> BundleSpec:
    files: dict[str, bytes | FileSpec] = {
        NGINX: FileSpec(b"events {}\n", on_change=("systemctl reload nginx",)),
        SITE: FileSpec(site, on_change=("systemctl reload nginx",)),
    }
    if extra:
        files[MOTD] = FileSpec(b"welcome to frodo\n", mode=0o600)
    return BundleSpec({"frodo": files, "camelot": {MOTD: b"camelot\n"}}, sequence=seq,
                      commit=f"{seq:040x}")


def read(root: Path, path: str) -> bytes:
    return (root / path.lstrip("/")).read_bytes()


def test_apply_writes_files_with_modes_and_runs_on_change_once(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    bundle = spec(1).write(tmp_path / "b1.tar", signing_key)
    report = Host(root).apply(bundle)
    assert read(root, NGINX) == b"events {}\n"
    assert (root / "etc/motd").stat().st_mode & 0o7777 == 0o600
    assert systemctl.calls() == ["systemctl reload nginx"]
    assert {c.path for c in report.plan.changes} == {NGINX, SITE, MOTD}
    # No staging temp files or backups are left beside the targets.
    assert sorted(p.name for p in (root / "etc/nginx").iterdir()) == ["conf.d", "nginx.conf"]


def test_reapply_same_bundle_changes_nothing(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    bundle = spec(1).write(tmp_path / "b1.tar", signing_key)
    Host(root).apply(bundle)
    systemctl.clear()
    before = snapshot(root / "etc")
    report = Host(root).apply(bundle)
    assert report.plan.empty
    assert report.noop
    assert systemctl.calls() == []
    assert snapshot(root / "etc") == before


def test_update_remove_and_rollback(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    host.apply(spec(1).write(tmp_path / "b1.tar", signing_key))
    v1 = snapshot(root / "etc")
    systemctl.clear()
    report = host.apply(spec(2, site=b"server { listen 9090; }\n", extra=False)
                        .write(tmp_path / "b2.tar", signing_key))
    assert {(c.kind, c.path) for c in report.plan.changes} == {("update", SITE),
                                                                ("remove", MOTD)}
    assert not (root / "etc/motd").exists()
    assert systemctl.calls() == ["systemctl reload nginx"]
    host.rollback()
    assert snapshot(root / "etc") == v1
    assert host.status()["current"]["bundle_id"].startswith("1-")
    with pytest.raises(NoRollbackTargetError):
        host.rollback()
    events = [r["event"] for r in host.history()]
    assert events == ["apply", "apply", "rollback"]


def test_replay_of_older_bundle_is_refused(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    old = spec(1).write(tmp_path / "b1.tar", signing_key)
    host.apply(spec(2).write(tmp_path / "b2.tar", signing_key))
    before = snapshot(root)
    with pytest.raises(ReplayError, match="sequence 1, not above 2") as e:
        host.apply(old)
    assert e.value.exit_code == ExitCode.POLICY
    assert snapshot(root) == before


def test_bundle_without_this_host_is_refused(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    bundle = BundleSpec({"camelot": {MOTD: b"x\n"}}).write(tmp_path / "b.tar", signing_key)
    before = snapshot(root)
    with pytest.raises(HostNotInBundleError, match="no files for host 'frodo'"):
        Host(root).apply(bundle)
    assert snapshot(root) == before


def test_failing_validate_changes_nothing(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    host.apply(spec(1).write(tmp_path / "b1.tar", signing_key))
    before = snapshot(root / "etc")
    bad = BundleSpec({"frodo": {NGINX: FileSpec(b"broken\n", validate=("false {path}",),
                                                on_change=("systemctl reload nginx",))}},
                     sequence=2, commit="2" * 40)
    systemctl.clear()
    with pytest.raises(ValidationFailedError, match=r"validate 'false \{path\}' failed"):
        host.apply(bad.write(tmp_path / "b2.tar", signing_key))
    assert snapshot(root / "etc") == before
    assert systemctl.calls() == []
    assert host.history()[-1]["result"].startswith("failed")


def test_dry_run_changes_nothing(root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    bundle = spec(1).write(tmp_path / "b1.tar", signing_key)
    before = snapshot(root)
    report = Host(root).apply(bundle, dry_run=True)
    assert report.dry_run
    assert len(report.plan.changes) == 3
    assert snapshot(root) == before


def test_status_json_shape(root: Path, tmp_path: Path, signing_key: KeyPair,
                           systemctl: Systemctl) -> None:
    Host(root).apply(spec(1).write(tmp_path / "b1.tar", signing_key))
    status = json.loads(json.dumps(Host(root).status()))
    assert status["current"]["sequence"] == 1
    assert status["last_result"]["result"] == "ok"


def test_retention_keeps_the_last_n_and_rollback_to_any_of_them(
        tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    root = tmp_path / "frodo"
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    init_host(root, "frodo", signers, retain=3)
    host = Host(root)
    for seq in range(1, 6):
        host.apply(spec(seq, site=f"server {{ listen {8000 + seq}; }}\n".encode())
                   .write(tmp_path / f"b{seq}.tar", signing_key))
    retained = [r["sequence"] for r in host.status()["retained"]]
    assert retained == [3, 4, 5]
    # Content only the dropped bundles used is gone from the store.
    objects = {p.name for p in (root / "var/lib/gitops-apply/objects").rglob("*")
               if p.is_file()}
    site1 = spec(1, site=b"server { listen 8001; }\n").manifest().hosts["frodo"].by_path()[SITE]
    assert site1.sha256 not in objects
    host.rollback(to=host.status()["retained"][0]["bundle_id"])
    assert read(root, SITE) == b"server { listen 8003; }\n"
    with pytest.raises(StateError, match="no retained bundle"):
        host.rollback(to="1-")


def test_retention_follows_the_order_of_applies_not_the_clock(
        tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The RTC battery dies between two applies and the clock reads 1970: the bundle
    applied just before the current one is still the one kept, and rollback's target.
    (The host's clock is handed to Host; the process's is set back too, for any code
    that would read it behind the host's back.)"""
    root = tmp_path / "frodo"
    init_host(root, "frodo", write_allowed_signers(tmp_path / "allowed_signers", signing_key),
              retain=2)
    clock = [1_800_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(time, "time_ns", lambda: int(clock[0] * 1e9))
    for seq, then in ((1, 1_800_000_000.0), (2, 1_800_001_000.0), (3, 100.0), (4, 200.0)):
        clock[0] = then
        Host(root, clock=lambda: clock[0]).apply(
            spec(seq, site=f"server {{ listen {8000 + seq}; }}\n".encode())
            .write(tmp_path / f"b{seq}.tar", signing_key))
    host = Host(root, clock=lambda: clock[0])
    assert [r["sequence"] for r in host.status()["retained"]] == [3, 4]
    assert host.rollback().bundle_id == spec(3).manifest().bundle_id


def test_host_keeps_its_part_of_retained_bundles_and_reads_older_state(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    host.apply(spec(1).write(tmp_path / "b1.tar", signing_key))
    host.apply(spec(2, site=b"server { listen 9090; }\n").write(tmp_path / "b2.tar",
                                                                 signing_key))
    bundles = root / "var/lib/gitops-apply/bundles"
    parts = {d.name: json.loads((d / "host.json").read_bytes()) for d in bundles.iterdir()}
    # Only this host's files are kept beside the signed manifest, for drift/status/plan.
    assert {p["host"] for p in parts.values()} == {"frodo"}
    assert [f["path"] for f in parts[next(iter(parts))]["files"]] == [MOTD, SITE, NGINX]
    # State written before host.json and meta's sequence existed still works.
    for d in bundles.iterdir():
        (d / "host.json").unlink()
        meta = json.loads((d / "meta.json").read_bytes())
        del meta["sequence"], meta["commit"]
        (d / "meta.json").write_text(json.dumps(meta))
    assert [r["sequence"] for r in host.status()["retained"]] == [1, 2]
    host.rollback()
    assert read(root, SITE) == b"server { listen 8080; }\n"


def test_each_account_name_is_looked_up_once_per_operation(
        root: Path, tmp_path: Path, signing_key: KeyPair, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    """getpwnam/getgrnam read the account files on every call: once per name per
    operation, not per file; the next operation (``watch`` runs many in one process)
    looks again, so an account added in between is seen."""
    def files(tag: bytes) -> dict[str, bytes | FileSpec]:
        return {f"/etc/app/{i:02d}.conf": FileSpec(tag + b"%d\n" % i, owner="root",
                                                    group="root") for i in range(20)}

    calls: list[str] = []
    real_user, real_group = pwd.getpwnam, grp.getgrnam

    def user(name: str) -> pwd.struct_passwd:
        calls.append("user " + name)
        return real_user(name)

    def group(name: str) -> grp.struct_group:
        calls.append("group " + name)
        return real_group(name)

    monkeypatch.setattr(pwd, "getpwnam", user)
    monkeypatch.setattr(grp, "getgrnam", group)
    host = Host(root)
    for seq, tag in ((1, b"one "), (2, b"two ")):
        host.apply(BundleSpec({"frodo": files(tag)}, sequence=seq, commit=f"{seq:040x}")
                   .write(tmp_path / f"b{seq}.tar", signing_key))
    assert read(root, "/etc/app/19.conf") == b"two 19\n"
    assert calls == ["user root", "group root"] * 2


def test_directories_an_apply_creates_are_0755_whatever_the_umask(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    """A hardened umask (077) must not leave a new config directory that the service's
    unprivileged workers cannot enter."""
    bundle = spec(1).write(tmp_path / "b1.tar", signing_key)
    old = os.umask(0o077)
    try:
        Host(root).apply(bundle)
    finally:
        os.umask(old)
    for d in ("etc/nginx", "etc/nginx/conf.d"):
        assert (root / d).stat().st_mode & 0o7777 == 0o755, d
