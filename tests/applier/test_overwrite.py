"""What an apply replaces or removes that the current bundle did not put there.

Nothing is lost: a file the tool never managed (the package's nginx.conf that the
first apply takes over) or a managed file changed out of band is copied into a saved
set before it is overwritten or removed (``drift --history`` / ``drift --restore``).
A directory is never replaced or removed by an apply, and two manifest paths that
are one file on this host (through a directory symlink) are refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from applier import drift
from applier.apply import Host
from applier.cli import main
from applier.errors import ExitCode, PathPolicyError

from conftest import Systemctl
from factory import BundleSpec, FileSpec, KeyPair, snapshot

CONF = "/etc/app/app.conf"


def bundle(tmp_path: Path, key: KeyPair, seq: int, files: dict[str, bytes | FileSpec],
           ) -> Path:
    return BundleSpec({"frodo": files}, sequence=seq, commit=f"{seq:040x}").write(
        tmp_path / f"b{seq}.tar", key)


def disk(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def test_first_apply_saves_the_file_it_takes_over(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    disk(root, CONF).parent.mkdir(parents=True)
    disk(root, CONF).write_bytes(b"# as the package shipped it\n")
    os.chmod(disk(root, CONF), 0o640)
    host = Host(root)
    report = host.apply(bundle(tmp_path, signing_key, 1, {CONF: b"ours\n", "/etc/new": b"n"}))
    assert disk(root, CONF).read_bytes() == b"ours\n"
    assert report.saved is not None
    [saved] = drift.history(host.layout)
    assert (saved.id, saved.purpose) == (report.saved, "apply")
    [record] = saved.files
    assert (record["path"], record["drift"], record["mode"]) == (CONF, "unmanaged", "0640")
    out = tmp_path / "review"
    drift.restore(host.layout, saved.id, out)
    assert (out / CONF.lstrip("/")).read_bytes() == b"# as the package shipped it\n"
    [rec] = [r for r in host.history() if r["event"] == "apply"]
    assert rec["saved"] == saved.id


def test_an_update_of_an_untouched_managed_file_saves_nothing(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    host.apply(bundle(tmp_path, signing_key, 1, {CONF: b"v1\n", "/etc/gone": b"g\n"}))
    report = host.apply(bundle(tmp_path, signing_key, 2, {CONF: b"v2\n"}))
    assert {c.kind for c in report.plan.changes} == {"update", "remove"}
    assert report.saved is None
    assert drift.history(host.layout) == []


def test_a_managed_file_changed_out_of_band_is_saved_before_update_or_removal(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    host.apply(bundle(tmp_path, signing_key, 1, {CONF: b"v1\n", "/etc/gone": b"g\n"}))
    disk(root, CONF).write_bytes(b"hand edit\n")
    disk(root, "/etc/gone").write_bytes(b"hand edit of a file git drops\n")
    report = host.apply(bundle(tmp_path, signing_key, 2, {CONF: b"v2\n"}))
    assert not disk(root, "/etc/gone").exists()
    [saved] = drift.history(host.layout)
    assert saved.id == report.saved
    assert {f["path"]: f["drift"] for f in saved.files} == {CONF: "drifted",
                                                           "/etc/gone": "drifted"}
    out = tmp_path / "review"
    drift.restore(host.layout, saved.id, out)
    assert (out / "etc/gone").read_bytes() == b"hand edit of a file git drops\n"
    assert (out / CONF.lstrip("/")).read_bytes() == b"hand edit\n"


def test_a_directory_in_the_way_is_refused_and_kept(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl,
        capsys: pytest.CaptureFixture[str]) -> None:
    for path in ("/etc/ssh", "/etc"):  # an unmanaged directory; the host's whole /etc
        (disk(root, "/etc/ssh") / "keep").mkdir(parents=True, exist_ok=True)
        (disk(root, "/etc/ssh") / "keep/sshd_config").write_bytes(b"Port 22\n")
        before = snapshot(root)
        b = bundle(tmp_path, signing_key, 1, {path: b"a file\n"})
        code = main(["--root", str(root), "apply", str(b)])
        err = capsys.readouterr().err
        assert code == ExitCode.POLICY, err
        assert path in err
        assert len(err.strip().splitlines()) == 1, err
        assert snapshot(root) == before


def test_a_dropped_path_that_became_a_directory_is_left_in_place(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    host.apply(bundle(tmp_path, signing_key, 1, {"/etc/app.d": b"file\n", CONF: b"v1\n"}))
    disk(root, "/etc/app.d").unlink()
    disk(root, "/etc/app.d").mkdir()
    (disk(root, "/etc/app.d") / "operator-notes.txt").write_bytes(b"mine\n")
    report = host.apply(bundle(tmp_path, signing_key, 2, {CONF: b"v1\n"}))
    assert report.plan.empty
    assert (disk(root, "/etc/app.d") / "operator-notes.txt").read_bytes() == b"mine\n"


def test_two_paths_to_one_file_through_a_directory_symlink_are_refused(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    disk(root, "/srv/data").mkdir(parents=True)
    os.symlink("/srv/data", disk(root, "/etc/app"))
    b = bundle(tmp_path, signing_key, 1, {"/etc/app/x.conf": b"one\n",
                                          "/srv/data/x.conf": b"two\n"})
    with pytest.raises(PathPolicyError, match="same file on this host as"):
        Host(root).apply(b)
    assert not disk(root, "/srv/data/x.conf").exists()


def test_renaming_a_path_to_its_symlinked_spelling_keeps_the_file(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    """Bundle 2 names by its real path the file bundle 1 named through a directory
    symlink: one file, still managed, not removed as 'no longer managed'."""
    disk(root, "/srv/data").mkdir(parents=True)
    os.symlink("/srv/data", disk(root, "/etc/app"))
    host = Host(root)
    host.apply(bundle(tmp_path, signing_key, 1, {"/etc/app/x.conf": b"x\n"}))
    report = host.apply(bundle(tmp_path, signing_key, 2, {"/srv/data/x.conf": b"x\n"}))
    assert report.plan.by_kind("remove") == []
    assert disk(root, "/srv/data/x.conf").read_bytes() == b"x\n"
    assert drift.check(host).drifted == []


def test_dry_run_says_what_it_would_save_and_saves_nothing(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl,
        capsys: pytest.CaptureFixture[str]) -> None:
    disk(root, CONF).parent.mkdir(parents=True)
    disk(root, CONF).write_bytes(b"theirs\n")
    b = bundle(tmp_path, signing_key, 1, {CONF: b"ours\n"})
    assert main(["--root", str(root), "apply", "--dry-run", str(b)]) == 0
    assert f"would first save 1 file(s) the current bundle did not put there: {CONF}" \
        in capsys.readouterr().out
    assert disk(root, CONF).read_bytes() == b"theirs\n"
    assert drift.history(Host(root).layout) == []
    assert main(["--root", str(root), "apply", str(b)]) == 0
    assert "saved 1 file(s) the current bundle did not put there" in capsys.readouterr().out


def test_two_dropped_paths_that_became_one_file_are_removed_once(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    """/srv/b became a symlink to /srv/a: the two paths bundle 1 managed are one file
    now. Bundle 2 drops both; the file goes once, and the apply succeeds."""
    host = Host(root)
    host.apply(bundle(tmp_path, signing_key, 1, {"/srv/a/x": b"x\n", "/srv/b/x": b"x\n",
                                                 CONF: b"v1\n"}))
    shutil.rmtree(disk(root, "/srv/b"))
    os.symlink("a", disk(root, "/srv/b"))
    report = host.apply(bundle(tmp_path, signing_key, 2, {CONF: b"v1\n"}))
    assert [c.path for c in report.plan.by_kind("remove")] == ["/srv/a/x"]
    assert not disk(root, "/srv/a/x").exists()
