"""``gitops-bundle``'s command line: a command line that cannot run is one line, exit 2.

Every other refusal of either command is one line on stderr with its own exit code;
click's own usage errors (a usage dump, a blank line, then the error) are rewritten
to that form, and ``--expires`` that is not a duration is one of them.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from applier.errors import ExitCode
from bundler import cli as bundler_cli

from factory import KeyPair

CASES = [
    ("unknown option", ["build", "--bogus"],
     r"No such option '--bogus'.* \(see: gitops-bundle build --help\)$"),
    ("unknown command", ["nosuch"],
     r"No such command 'nosuch'\. \(see: gitops-bundle --help\)$"),
    ("missing key", ["build", "{repo}", "-o", "{tmp}/b.tar"], r"Missing option '--key'"),
    ("output is a directory", ["build", "{repo}", "--key", "{key}", "-o", "{tmp}"],
     r"Invalid value for '-o' / '--output': .* is a directory"),
    ("output named like a directory",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/bundles/"],
     r"'.*/bundles/' names a directory: give the bundle's file name"),
    ("expires not a duration",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--expires", "5q"],
     r"Invalid value for '--expires': '5q' is not a duration like 90s, 12h, 30d"),
    ("expires zero",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--expires", "0d"],
     r"Invalid value for '--expires': the duration must be positive"),
    ("expires past a century",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--expires", "99999999999999w"],
     r"Invalid value for '--expires': '99999999999999w' is more than 100 years"),
    ("sequence zero",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--sequence", "0"],
     r"Invalid value for '--sequence': 0 is not in the range"),
    ("sequence too large",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--sequence", "9" * 23],
     r"Invalid value for '--sequence': 9+ is not in the range"),
    ("jobs zero", ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--jobs", "0"],
     r"Invalid value for '--jobs': 0 is not in the range"),
    ("trust update missing",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--trust-update",
      "{tmp}/missing"], r"--trust-update: .*/missing: cannot read: No such file"),
    ("trust update not allowed_signers",
     ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar", "--trust-update", "{key}"],
     r"--trust-update: .*ops"),
    ("branch with a space", ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar",
                             "--branch", "x y"],
     r"Invalid value for '--branch': 'x y' is not a branch name"),
    ("branch with a plus", ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar",
                            "--branch", "a+b"],
     r"Invalid value for '--branch': 'a\+b' is not a branch name"),
    ("branch with dot dot", ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar",
                             "--branch", "a..b"], r"'a\.\.b' is not a branch name"),
    ("repo name with a newline", ["build", "{repo}", "--key", "{key}", "-o", "{tmp}/b.tar",
                                  "--repo-name", "a\nb"],
     r"Invalid value for '--repo-name': 'a\\nb' is not a repository name"),
    ("verify threshold zero",
     ["verify", "{key}", "--allowed-signers", "{key}", "--threshold", "0"],
     r"Invalid value for '--threshold': 0 is not in the range"),
    ("verify allowed signers missing",
     ["verify", "{key}", "--allowed-signers", "{tmp}/missing"],
     r".*/missing: cannot read: No such file"),
]


@pytest.mark.parametrize(("argv", "message"), [(a, m) for _, a, m in CASES],
                         ids=[n for n, _, _ in CASES])
def test_a_command_line_that_cannot_run_is_one_line_and_exit_2(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(repo=fleet_repo, key=signing_key.private, tmp=out) for a in argv]
    code = bundler_cli.main(args)
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gitops-bundle: error: ")
    assert re.search(message, err), err
    assert list(out.iterdir()) == []


def test_a_valid_expiry_reaches_the_manifest(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "2000000000")
    out = tmp_path / "b.tar"
    assert bundler_cli.main(["build", str(fleet_repo), "--key", str(signing_key.private),
                             "-o", str(out), "--expires", "2h"]) == 0
    capsys.readouterr()
    assert bundler_cli.main(["inspect", str(out), "--json"]) == 0
    assert '"expires": 2000007200' in capsys.readouterr().out


def test_output_that_is_not_a_regular_file_or_is_the_key_is_refused(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The bundle replaces its output by rename: ``-o /dev/null`` run as root would
    replace the device, and ``-o`` naming the key would replace the only copy of it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    null_link = tmp_path / "null"
    null_link.symlink_to("/dev/null")
    key = tmp_path / "ops"
    shutil.copy2(signing_key.private, key)
    key_bytes = key.read_bytes()
    for out, message in ((fifo, r"'.*/fifo' exists and is not a regular file"),
                         (null_link, r"'.*/null' exists and is not a regular file"),
                         (key, r"'.*/ops' is the signing key \(--key\)")):
        code = bundler_cli.main(["build", str(fleet_repo), "--key", str(key), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == ExitCode.USAGE, err
        assert len(err.splitlines()) == 1, err
        assert re.search(message, err), err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert null_link.is_symlink()
    assert key.read_bytes() == key_bytes
    bundle = tmp_path / "b.tar"
    assert bundler_cli.main(["build", str(fleet_repo), "--key", str(key), "-o",
                             str(bundle)]) == 0
    capsys.readouterr()
    assert bundler_cli.main(["sign", str(bundle), "--key", str(key), "-o", str(key)]) \
        == ExitCode.USAGE
    assert "is the signing key" in capsys.readouterr().err
    assert key.read_bytes() == key_bytes


def test_a_bad_source_date_epoch_or_a_second_signature_by_one_key_is_exit_2(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "b.tar"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    build = ["build", str(fleet_repo), "--key", str(signing_key.private), "-o", str(bundle)]
    assert bundler_cli.main([*build, "--expires", "1d"]) == ExitCode.USAGE
    assert "SOURCE_DATE_EPOCH='yesterday' is not a Unix time" in capsys.readouterr().err
    assert not bundle.exists()
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert bundler_cli.main(build) == 0
    capsys.readouterr()
    assert bundler_cli.main(["sign", str(bundle), "--key", str(signing_key.private)]) \
        == ExitCode.USAGE
    assert "already signed by" in capsys.readouterr().err


def test_an_output_name_of_250_characters_is_written(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The temp file beside it is not named after it: no room for a suffix."""
    out = tmp_path / ("b" * 243 + ".tar.gz")
    assert bundler_cli.main(["build", str(fleet_repo), "--key", str(signing_key.private),
                             "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
