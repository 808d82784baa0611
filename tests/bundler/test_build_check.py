"""The builder reads every bundle back with the host's reader before it is published.

A build writes a temp file, reads it back as a host would (signature, canonical
manifest, every member's digest and size) and only then renames it into place. The
parse of the manifest runs in a forked process beside the writing; these tests hold
that the read-back still rejects what is not what was signed, that a failure of that
parse fails the build, and that the bytes are the same whichever way it ran.
"""

from __future__ import annotations

import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from applier.bundle import BundleFile
from applier.errors import ApplierError, ExitCode, ManifestError
from applier.manifest import Manifest
from bundler import build as build_module
from bundler import cli as bundler_cli
from bundler import writer
from bundler.build import BuildOptions, build
from bundler.errors import BuildError
from bundler.signing import load_signing_key

from conftest import commit_all, free_bytes
from factory import KeyPair


def run_build(repo: Path, key: KeyPair, out: Path) -> Path:
    build(BuildOptions(repo=repo, out=out, compression="none"),
          load_signing_key(key.private, None))
    return out


def cli_build(repo: Path, key: KeyPair, out: Path,
              capsys: pytest.CaptureFixture[str], kind: str) -> tuple[int, list[str]]:
    """``gitops-bundle build`` through its CLI: the exit code and the stderr lines of
    ``kind`` ("error", "warning")."""
    code = bundler_cli.main(["build", str(repo), "--key", str(key.private), "-o", str(out)])
    return code, [line for line in capsys.readouterr().err.splitlines() if kind in line]


def test_a_file_that_is_not_what_was_signed_is_never_published(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def write_then_corrupt(out: Path, *args: Any, **kw: Any) -> int:
        check = kw["check"]

        def corrupt_then_check(tmp: Path) -> None:
            data = bytearray(tmp.read_bytes())
            data[512 + 100] ^= 0x01  # in manifest.json, the first member's content
            tmp.write_bytes(bytes(data))
            check(tmp)
        kw["check"] = corrupt_then_check
        return writer.write_tar(out, *args, **kw)

    monkeypatch.setattr(build_module, "write_tar", write_then_corrupt)
    out = tmp_path / "b.tar"
    with pytest.raises(ApplierError, match="signature"):
        run_build(fleet_repo, signing_key, out)
    # Neither the bundle nor its temp file nor the build's scratch dir is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == [fleet_repo.name]


def test_a_failed_manifest_check_beside_the_writing_fails_the_build(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes, host: str | None = None) -> Manifest:
        raise ManifestError("manifest hosts.frodo: refused by the test")

    # Set before the fork, so the child process parses with it too.
    monkeypatch.setattr(Manifest, "from_bytes", staticmethod(refuse))
    out = tmp_path / "b.tar"
    with pytest.raises(ManifestError, match="refused by the test"):
        run_build(fleet_repo, signing_key, out)
    assert not out.exists()


def test_the_bytes_do_not_depend_on_where_the_check_ran(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    forked: list[bool] = []
    real_enter = build_module._ParseBeside.__enter__

    def enter(self: build_module._ParseBeside) -> build_module._ParseBeside:
        result = real_enter(self)
        forked.append(self._pool is not None)
        return result

    monkeypatch.setattr(build_module._ParseBeside, "__enter__", enter)
    beside = run_build(fleet_repo, signing_key, tmp_path / "a.tar")
    # Another thread running: no fork (a lock could be held across it), parsed here.
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        here = run_build(fleet_repo, signing_key, tmp_path / "b.tar")
    finally:
        stop.set()
        thread.join()
    assert forked == [True, False]
    assert beside.read_bytes() == here.read_bytes()


@pytest.mark.parametrize("where", ["missing/b.tar", "file/b.tar"])
def test_an_output_directory_that_cannot_hold_the_bundle_is_one_error(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str], where: str) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    out = tmp_path / where
    code = bundler_cli.main(["build", str(fleet_repo), "--key", str(signing_key.private),
                             "-o", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.IO
    assert lines[-1].startswith(f"gitops-bundle: error: cannot write {out}: "), lines
    assert "internal" not in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fleet_repo.name, "file"])



@pytest.mark.parametrize("jobs", ["1", "2"])
def test_no_room_for_the_rendered_files_is_one_error(
        fleet_repo: Path, tmp_path: Path, small_fs: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        jobs: str) -> None:
    # Rendered files wait in $TMPDIR until the tar is written (a build holds no
    # fleet's worth of them in memory); a $TMPDIR too small for them is said so, by
    # the parent or by a render worker.
    (fleet_repo / "templates/motd.j2").write_text("{{ host }}\n" + "x" * (2 << 20) + "\n")
    commit_all(fleet_repo, "A motd larger than the filesystem of TMPDIR")
    monkeypatch.setenv("TMPDIR", str(small_fs))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    out = tmp_path / "out.tar.gz"
    code = bundler_cli.main(["build", str(fleet_repo), "--key", str(signing_key.private),
                             "-o", str(out), "--jobs", jobs])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == ExitCode.IO
    assert len(errors) == 1, errors
    assert re.fullmatch(rf"gitops-bundle: error: cannot keep rendered files in "
                        rf"{re.escape(str(small_fs))}/gitops-bundle-render-\w+: "
                        "no space left on device", errors[0]), errors
    assert not out.exists()
    assert list(small_fs.iterdir()) == []  # the spool went with the error


def test_a_manifest_changed_on_disk_before_its_check_fails_the_build(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The manifest is written to a scratch file (a fleet's is too large to hold) and
    # hashed on the way; its check parses that file only if it still has that digest.
    real_write = build_module._write_manifest

    def write_then_change(*args: Any) -> Any:
        written = real_write(*args)
        data = bytearray(written.path.read_bytes())
        data[data.index(b'"subject":"') + 11] ^= 0x01  # still valid, canonical JSON
        written.path.write_bytes(bytes(data))
        return written

    monkeypatch.setattr(build_module, "_write_manifest", write_then_change)
    out = tmp_path / "b.tar"
    with pytest.raises(BuildError, match=r"manifest\.json: changed on disk while the bundle "
                                         "was built") as caught:
        run_build(fleet_repo, signing_key, out)
    assert caught.value.exit_code == ExitCode.IO
    assert sorted(p.name for p in tmp_path.iterdir()) == [fleet_repo.name]


def test_a_full_output_disk_while_the_manifest_is_written_is_one_error(
        fleet_repo: Path, tmp_path: Path, small_fs: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The manifest goes to a scratch file beside the output; room for the history
    # bundle that git writes there first, none for the manifest after it.
    sized = run_build(fleet_repo, signing_key, tmp_path / "sized.tar")
    manifest = Manifest.from_bytes(_signed_part(sized)[0])
    free = -(-manifest.git.size // _PAGE) * _PAGE
    filler = small_fs / "filler"
    _fill(filler, small_fs, free)
    out = small_fs / "b.tar.gz"
    code, errors = cli_build(fleet_repo, signing_key, out, capsys, "error")
    assert code == ExitCode.IO
    assert errors == [f"gitops-bundle: error: cannot write {out}: no space left on device"]
    assert list(small_fs.iterdir()) == [filler]  # the scratch directory went too


_PAGE = 4096


def _signed_part(path: Path) -> tuple[bytes, bytes]:
    with BundleFile(path) as bundle:
        return bundle.signed_part()


def _fill(filler: Path, fs: Path, leave: int) -> None:
    """Write ``filler`` until ``fs`` has exactly ``leave`` bytes free (whole pages)."""
    with filler.open("wb") as f:
        while free_bytes(fs) > leave:
            f.write(bytes(_PAGE))
            f.flush()
    assert free_bytes(fs) == leave


def _manifest_size(repo: Path, key: KeyPair, out: Path) -> tuple[int, int]:
    manifest_bytes = _signed_part(run_build(repo, key, out))[0]
    return len(manifest_bytes), len(Manifest.from_bytes(manifest_bytes).hosts)


def test_a_manifest_larger_than_a_host_accepts_fails_the_build_before_it_is_written(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A host refuses a manifest over MAX_MANIFEST_SIZE (64 MiB: a fleet of about 500
    # hosts of 550 files); the limit is lowered here to this fleet's size, less one.
    size, hosts = _manifest_size(fleet_repo, signing_key, tmp_path / "sized.tar")
    monkeypatch.setattr(build_module, "MAX_MANIFEST_SIZE", size - 1)
    out = tmp_path / "b.tar.gz"
    code, errors = cli_build(fleet_repo, signing_key, out, capsys, "error")
    assert code == ExitCode.REPO
    assert errors == [(f"gitops-bundle: error: manifest.json for {hosts} host(s) would be "
                       f"{size} bytes, and a host refuses one over {size - 1}: build the "
                       "fleet in several bundles (--host)")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [fleet_repo.name, "sized.tar"]


def test_a_manifest_near_the_limit_is_built_with_a_warning(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    size, hosts = _manifest_size(fleet_repo, signing_key, tmp_path / "sized.tar")
    monkeypatch.setattr(build_module, "MAX_MANIFEST_SIZE", size)  # exactly at the limit
    out = tmp_path / "b.tar.gz"
    code, warnings = cli_build(fleet_repo, signing_key, out, capsys, "warning")
    assert code == 0
    assert warnings == [(f"gitops-bundle: warning: manifest.json for {hosts} host(s) is "
                         f"{size} bytes, 100% of the {size} a host accepts: plan to build "
                         "the fleet in several bundles (--host)")]
    assert _signed_part(out)[0] == _signed_part(tmp_path / "sized.tar")[0]
