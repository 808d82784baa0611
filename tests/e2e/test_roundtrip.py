"""End to end through the installed console scripts: a commit becomes files on two hosts.

Real git, real ssh-keygen, real files under temporary roots. systemd cannot run as
PID 1 here and the app container does not exist, so ``systemctl`` and the health
probe (``curl``) are stand-ins on PATH that record their calls and succeed; nginx
is the real one when the example's commands call it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from applier.errors import ExitCode
from bundler.writer import Member, write_tar

from conftest import commit_all, git, require_tool, systemd_analyze_verify
from factory import KeyPair, snapshot, write_allowed_signers

BIN = Path(sys.executable).parent


def run(*args: str | Path, env: dict[str, str] | None = None, check: bool = True,
        stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in args]
    exe = BIN / cmd[0]
    if exe.exists():
        cmd[0] = str(exe)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                          input=None if stdin is None else stdin.decode())
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def stand_ins(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with recording stand-ins for systemctl and curl; the log they write."""
    require_tool("nginx")
    bindir = tmp_path / "stand-ins"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("systemctl", "curl"):
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 0\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}:/usr/sbin:/sbin"}
    return env, log


def calls(log: Path, prefix: str = "systemctl") -> list[str]:
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)]


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def repack(bundle: Path, out: Path, signature: bytes) -> Path:
    """The same bundle with another manifest.json.sig (as a co-signer's tool would)."""
    data = members(bundle)
    rest: Sequence[tuple[str, bytes]] = [(n, d) for n, d in data.items()
                                         if n not in ("manifest.json", "manifest.json.sig")]
    write_tar(out, data["manifest.json"], signature,
              [Member(n, len(d), (lambda d=d: [d])) for n, d in rest],  # type: ignore[misc]
              mtime=0, compression="none")
    return out


def managed(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Snapshot of the managed tree, without the tool's own state."""
    return {k: v for k, v in snapshot(root).items()
            if not k.startswith(("var/lib/gitops-apply", "etc/gitops-apply"))}


def test_build_apply_change_rollback_on_two_hosts(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        stand_ins: tuple[dict[str, str], Path]) -> None:
    env, log = stand_ins
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    v1 = tmp_path / "v1.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", v1, env=env)
    roots = {h: tmp_path / h for h in ("frodo", "camelot")}
    for host, root in roots.items():
        run("gitops-apply", "--root", root, "init", "--host", host,
            "--allowed-signers", signers, env=env)
        out = run("gitops-apply", "--root", root, "apply", v1, env=env).stdout
        assert "done:" in out
    assert (roots["frodo"] / "etc/nginx/nginx.conf").is_file()
    assert (roots["camelot"] / "opt/backup/backup.sh").stat().st_mode & 0o777 == 0o755
    # The shared, per-host-rendered file differs between the hosts.
    facts = [(r / "etc/gitops/host-facts.conf").read_bytes() for r in roots.values()]
    assert facts[0] != facts[1]
    first = {h: managed(r) for h, r in roots.items()}

    # Change one template (frodo's site config) and commit.
    site = fleet_repo / "templates/nginx/app.conf.j2"
    site.write_text(site.read_text() + "# tuned keepalive\n")
    commit_all(fleet_repo, "Tune the app site", date="2026-11-02T12:00:00Z")
    v2 = tmp_path / "v2.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", v2, env=env)
    log.unlink(missing_ok=True)
    for root in roots.values():
        run("gitops-apply", "--root", root, "apply", v2, env=env)
    assert (roots["frodo"] / "etc/nginx/conf.d/app.conf").read_text().endswith(
        "# tuned keepalive\n")
    # Only the changed file's on_change ran, on frodo only; camelot ran nothing.
    assert calls(log) == ["systemctl reload nginx"]
    assert managed(roots["camelot"]) == first["camelot"]

    run("gitops-apply", "--root", roots["frodo"], "rollback", env=env)
    assert managed(roots["frodo"]) == first["frodo"]
    status = run("gitops-apply", "--root", roots["frodo"], "status", "--json", env=env).stdout
    assert '"sequence": 1' in status
    history = run("gitops-apply", "--root", roots["frodo"], "history", env=env).stdout
    assert [line.split()[1] for line in history.splitlines()] == ["apply", "apply", "rollback"]


def test_two_builds_of_one_commit_are_byte_identical(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    for suffix in (".tar", ".tar.gz", ".tar.zst"):
        a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", a)
        run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", b)
        assert a.read_bytes() == b.read_bytes(), suffix
        # Each compression the builder writes is read back whole, its end checked.
        run("gitops-bundle", "verify", a, "--allowed-signers", signers)


def test_a_detached_ci_clone_rebuilds_the_same_bytes_when_told_the_branch(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """The workstation builds its checkout of main; CI clones into a directory of its
    own name and checks the commit out detached. Told the branch and the repo name,
    CI's build is the workstation's, byte for byte (a check that what was signed is
    what the commit makes); without them it records other provenance."""
    ours = tmp_path / "ours.tar.gz"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", ours)
    ci = tmp_path / "ci-workspace-1234"
    run("git", "clone", "-q", fleet_repo, ci)
    commit = run("git", "-C", ci, "rev-parse", "HEAD").stdout.strip()
    run("git", "-C", ci, "checkout", "-q", "--detach", commit)
    plain, told = tmp_path / "plain.tar.gz", tmp_path / "told.tar.gz"
    run("gitops-bundle", "build", ci, "--key", signing_key.private, "-o", plain)
    run("gitops-bundle", "build", ci, "--rev", commit, "--key", signing_key.private,
        "-o", told, "--branch", "main", "--repo-name", fleet_repo.name)
    assert plain.read_bytes() != ours.read_bytes()
    assert told.read_bytes() == ours.read_bytes()


def test_a_bare_mirror_builds_what_its_working_clone_builds(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """A build machine often keeps a bare mirror (infra.git): no working tree to check
    for changes, and the same bytes as a build from a working clone of it."""
    ours = tmp_path / "ours.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", ours)
    mirror = tmp_path / "mirror" / f"{fleet_repo.name}.git"
    run("git", "clone", "-q", "--bare", fleet_repo, mirror)
    built = tmp_path / "mirror.tar"
    run("gitops-bundle", "build", mirror, "--key", signing_key.private, "-o", built)
    assert built.read_bytes() == ours.read_bytes()


def test_repo_given_as_a_subdirectory_is_that_directory_of_the_repo(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """'build infra/fleet' is 'build infra --path fleet': the same gitops.yaml, the
    same source.path, the same bytes; and --path goes on from there."""
    (fleet_repo / "fleet").mkdir()
    for name in os.listdir(fleet_repo):
        if name not in (".git", "fleet"):
            os.rename(fleet_repo / name, fleet_repo / "fleet" / name)
    commit_all(fleet_repo, "Move the fleet into fleet/")
    by_path, by_dir = tmp_path / "by-path.tar", tmp_path / "by-dir.tar"
    run("gitops-bundle", "build", fleet_repo, "--path", "fleet", "--key",
        signing_key.private, "-o", by_path)
    run("gitops-bundle", "build", fleet_repo / "fleet", "--key", signing_key.private,
        "-o", by_dir)
    assert by_dir.read_bytes() == by_path.read_bytes()
    (fleet_repo / "infra").mkdir()
    os.rename(fleet_repo / "fleet", fleet_repo / "infra" / "fleet")
    commit_all(fleet_repo, "One level deeper")
    run("gitops-bundle", "build", fleet_repo / "infra", "--path", "fleet", "--key",
        signing_key.private, "-o", tmp_path / "deeper.tar")
    out = run("gitops-bundle", "inspect", tmp_path / "deeper.tar", "--json").stdout
    assert '"path": "infra/fleet"' in out


def test_a_build_terminated_midway_leaves_no_temp_files(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """A CI job cancelled (SIGTERM) while rendering cleans up as Ctrl-C does: no
    .gitops-build-* beside the output, nothing in TMPDIR, no bundle."""
    (fleet_repo / "templates" / "slow.j2").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n")
    config = fleet_repo / "gitops.yaml"
    config.write_text(config.read_text().replace(
        "files:\n", "files:\n  - src: templates/slow.j2\n    dest: /etc/slow\n", 1))
    commit_all(fleet_repo, "A template that takes a while")
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    proc = subprocess.Popen([str(BIN / "gitops-bundle"), "build", str(fleet_repo), "--key",
                             str(signing_key.private), "-o", str(out_dir / "b.tar")],
                            env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while not list(out_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the build has started: its work dir is there
    time.sleep(0.5)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "gitops-bundle: error: interrupted"
    assert list(out_dir.iterdir()) == []
    assert list(tmp.iterdir()) == []


def test_ssh_keygen_accepts_the_builders_signature(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    bundle = tmp_path / "b.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", bundle)
    data = members(bundle)
    assert list(data)[:2] == ["manifest.json", "manifest.json.sig"]
    sig = tmp_path / "manifest.json.sig"
    sig.write_bytes(data["manifest.json.sig"])
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    proc = run("ssh-keygen", "-Y", "verify", "-f", signers, "-I", signing_key.name,
               "-n", "gitops-bundle", "-s", sig, stdin=data["manifest.json"])
    assert "Good \"gitops-bundle\" signature" in proc.stdout


def test_a_signature_made_by_ssh_keygen_is_accepted(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair, other_key: KeyPair) -> None:
    built = tmp_path / "b.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", other_key.private, "-o", built)
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(members(built)["manifest.json"])
    run("ssh-keygen", "-Y", "sign", "-n", "gitops-bundle", "-f", signing_key.private, manifest)
    bundle = repack(built, tmp_path / "resigned.tar",
                    (tmp_path / "manifest.json.sig").read_bytes())
    root = tmp_path / "frodo"
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    run("gitops-apply", "--root", root, "init", "--host", "frodo", "--allowed-signers", signers)
    out = run("gitops-apply", "--root", root, "verify", bundle).stdout
    assert out.startswith("OK: bundle ")
    assert signing_key.name in out
    # The original, signed only by a key this host does not trust, is refused.
    proc = run("gitops-apply", "--root", root, "verify", built, check=False)
    assert proc.returncode == ExitCode.VERIFICATION


def test_git_history_bundle_verifies_and_holds_the_commit(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    bundle = tmp_path / "b.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", bundle)
    history = tmp_path / "history.bundle"
    history.write_bytes(members(bundle)["git/history.bundle"])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    git(scratch, "init", "-q")
    git(scratch, "bundle", "verify", str(history))
    head = git(fleet_repo, "rev-parse", "HEAD")
    assert head in git(scratch, "bundle", "list-heads", str(history))
    git(scratch, "fetch", "-q", str(history), "refs/heads/main:refs/heads/main")
    assert git(scratch, "rev-parse", "main") == head


def test_uncommitted_edits_never_leak_into_a_bundle(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    clean = tmp_path / "clean.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", clean)
    motd = fleet_repo / "templates/motd.j2"
    motd.write_text("EDITED BUT NOT COMMITTED\n")
    dirty = tmp_path / "dirty.tar"
    proc = run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", dirty)
    assert "uncommitted changes" in proc.stderr
    assert dirty.read_bytes() == clean.read_bytes()


@pytest.mark.parametrize("damage", ["flip-manifest", "flip-blob", "truncate", "untrusted"])
def test_damaged_or_untrusted_bundles_change_nothing(
        damage: str, fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        other_key: KeyPair) -> None:
    key = other_key if damage == "untrusted" else signing_key
    bundle = tmp_path / "b.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", key.private, "-o", bundle)
    data = bytearray(bundle.read_bytes())
    if damage == "flip-manifest":
        data[600] ^= 0x01  # inside manifest.json, after its 512-byte header
    elif damage == "flip-blob":
        data[-(10240 + 4000)] ^= 0x01  # inside the payload, before the end padding
    elif damage == "truncate":
        del data[len(data) // 2:]
    bundle.write_bytes(bytes(data))
    root = tmp_path / "frodo"
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    run("gitops-apply", "--root", root, "init", "--host", "frodo", "--allowed-signers", signers)
    before = snapshot(root)
    proc = run("gitops-apply", "--root", root, "apply", bundle, check=False)
    assert proc.returncode == ExitCode.VERIFICATION, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("gitops-apply: error: ")
    assert snapshot(root) == before


def test_missing_key_and_bad_repo_write_no_bundle(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    out = tmp_path / "b.tar"
    proc = run("gitops-bundle", "build", fleet_repo, "--key", tmp_path / "nope", "-o", out,
               check=False)
    assert proc.returncode == ExitCode.KEY
    assert "no such key file" in proc.stderr
    (fleet_repo / "gitops.yaml").write_text(
        (fleet_repo / "gitops.yaml").read_text().replace("on_change:", "on_chnage:", 1))
    commit_all(fleet_repo, "typo", date="2026-11-03T12:00:00Z")
    proc = run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", out,
               check=False)
    assert proc.returncode == ExitCode.REPO
    assert "gitops.yaml:" in proc.stderr
    assert "on_change" in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.tar")]


def test_nginx_accepts_frodos_rendered_config(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        stand_ins: tuple[dict[str, str], Path]) -> None:
    env, _ = stand_ins
    nginx = require_tool("nginx")
    bundle = tmp_path / "b.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", bundle)
    root = tmp_path / "frodo"
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    run("gitops-apply", "--root", root, "init", "--host", "frodo", "--allowed-signers", signers)
    run("gitops-apply", "--root", root, "apply", bundle, env=env)
    conf = root / "etc/nginx/nginx.conf"
    proc = subprocess.run([nginx, "-t", "-c", str(conf), "-g", f"pid {tmp_path}/nginx.pid;"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


def test_systemd_analyze_accepts_camelots_units(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        stand_ins: tuple[dict[str, str], Path]) -> None:
    env, _ = stand_ins
    bundle = tmp_path / "b.tar"
    run("gitops-bundle", "build", fleet_repo, "--key", signing_key.private, "-o", bundle)
    root = tmp_path / "camelot"
    signers = write_allowed_signers(tmp_path / "allowed_signers", signing_key)
    run("gitops-apply", "--root", root, "init", "--host", "camelot", "--allowed-signers",
        signers)
    run("gitops-apply", "--root", root, "apply", bundle, env=env)
    units = ("/etc/systemd/system/backup.service", "/etc/systemd/system/backup.timer")
    proc = systemd_analyze_verify(root, *units)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The check has teeth: the service without its script is refused.
    (root / "opt/backup/backup.sh").unlink()
    proc = systemd_analyze_verify(root, *units)
    assert proc.returncode != 0
    assert "backup.sh" in proc.stdout + proc.stderr
