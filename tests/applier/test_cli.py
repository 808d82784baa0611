"""The host's command line: usage errors are one line and exit 2, nothing else runs.

``gitops-apply`` runs as root on every host, so it parses its arguments with the
standard library alone; these tests hold what an operator (and the systemd units and
``install-from-usb``) rely on: global options before the command, each command's own
options after it, no guessed abbreviations, ``--help`` and ``--version``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from applier.cli import main
from applier.errors import ExitCode

from factory import BundleSpec, KeyPair, snapshot


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bundle(tmp_path: Path, signing_key: KeyPair) -> Path:
    return BundleSpec({"frodo": {"/etc/motd": b"hello\n"}}).write(tmp_path / "b.tar",
                                                                  signing_key)


@pytest.mark.parametrize(("args", "says"), [
    ((), "a COMMAND is required"),
    (("aply",), "invalid choice: 'aply'"),
    (("apply",), "required: BUNDLE"),
    (("apply", "BUNDLE", "--dry"), "unrecognized arguments: --dry"),  # no abbreviations
    (("status", "--wait", "3"), "unrecognized arguments: --wait 3"),  # global goes first
    (("--wait", "soon", "status"), "argument --wait: invalid float value: 'soon'"),
    (("watch", "INBOX", "--interval", "0"), "argument --interval: 0 is below 0.01"),
    (("drift", "--fix", "--history"), "--fix, --history and --restore are exclusive"),
    (("drift", "--path", "/etc/motd"), "--to and --path go with --restore"),
    (("verify", "ROOT"), "is a directory"),
    (("init", "--host", "web 01", "--allowed-signers", "BUNDLE"),
     "argument --host: 'web 01' is not a host name"),
    (("init", "--host", "web01", "--allowed-signers", "BUNDLE", "--retain", "0"),
     "argument --retain: 0 is not in 1..1000"),
    (("init", "--host", "web01", "--allowed-signers", "BUNDLE", "--threshold", "two"),
     "argument --threshold: 'two' is not a whole number"),
], ids=["no-command", "unknown-command", "missing-bundle", "abbreviation", "global-after",
        "bad-number", "below-range", "exclusive", "restore-only", "directory-as-bundle",
        "init-host-name", "init-retain", "init-threshold"])
def test_a_usage_error_is_one_line_and_exit_2_and_changes_nothing(
        root: Path, bundle: Path, capsys: pytest.CaptureFixture[str],
        args: tuple[str, ...], says: str) -> None:
    before = snapshot(root)
    argv = [str(bundle) if a == "BUNDLE" else str(root) if a == "ROOT"
            else str(root / "inbox") if a == "INBOX" else a for a in args]
    code, out, err = run(capsys, "--root", str(root), *argv)
    assert code == ExitCode.USAGE
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("gitops-apply: error: ")
    assert says in err
    assert snapshot(root) == before


def test_global_options_then_the_command_and_its_own(
        root: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--root", str(root), "-v", "--wait", "1", "apply",
                       "--dry-run", str(bundle), "--json")
    assert code == ExitCode.OK
    assert json.loads(out)["dry_run"] is True
    assert not (root / "etc/motd").exists()
    code, out, _ = run(capsys, "--root", str(root), "apply", str(bundle))
    assert code == ExitCode.OK
    assert (root / "etc/motd").read_bytes() == b"hello\n"
    code, out, _ = run(capsys, "--root", str(root), "status", "--json")
    assert json.loads(out)["host"] == "frodo"


def test_help_lists_every_command_and_each_command_has_its_own(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--help")
    assert code == ExitCode.OK
    assert err == ""
    for command in ("init", "verify", "apply", "rollback", "recover", "status", "history",
                    "drift", "watch"):
        assert f"\n  {command} " in out
        code, sub, _ = run(capsys, command, "--help")
        assert code == ExitCode.OK
        assert sub.startswith(f"usage: gitops-apply {command}")
    assert "--fix" in run(capsys, "drift", "--help")[1]


def test_version_names_the_tool_and_its_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "applier.cli", "--version"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("gitops-apply, version ")
    assert proc.stdout.split()[-1][0].isdigit()


@pytest.mark.parametrize("args", [
    ("apply", "BUNDLE"), ("rollback",), ("drift",), ("drift", "--fix"), ("recover",),
    ("status",), ("verify", "BUNDLE"),
], ids=lambda a: "-".join(a).lower())
def test_a_host_never_initialised_is_one_line_exit_9_and_nothing_created(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str],
        args: tuple[str, ...]) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    argv = [str(bundle) if a == "BUNDLE" else a for a in args]
    code, out, err = run(capsys, "--root", str(root), *argv)
    assert code == ExitCode.HOST_CONFIG, (out, err)
    expected = (f"gitops-apply: error: {root}/etc/gitops-apply/config.yaml: host not "
                "initialised (run: gitops-apply init --host NAME --allowed-signers FILE)")
    assert err.splitlines() == [expected]
    assert list(root.iterdir()) == []
