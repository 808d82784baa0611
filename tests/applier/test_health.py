"""Check, on_change and health: the order they run in, and what a failure undoes.

Issue 4's rules: ``check`` runs on the live tree after the swap and before any reload,
and a failure restores the old files with no service told; ``health`` runs after the
reloads (timeout, retries, delay) and a failure rolls back *and* reloads again so the
services read the old files. Either failure is remembered: the bundle is refused
(BadBundleError) until ``apply --force``. Commands that hang are killed at their
timeout and count as failures.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from applier import commands
from applier.apply import Host
from applier.cli import main
from applier.errors import (
    BadBundleError,
    CommandError,
    ExitCode,
    HealthCheckError,
    ValidationFailedError,
)
from applier.manifest import Command

from conftest import Systemctl
from factory import BundleSpec, FileSpec, KeyPair, snapshot

CONF = "/etc/app/app.conf"
RELOAD = "systemctl reload app"


def bundle(tmp_path: Path, key: KeyPair, seq: int, content: bytes, **cmds: object) -> Path:
    spec = FileSpec(content, **cmds)  # type: ignore[arg-type]
    return BundleSpec({"frodo": {CONF: spec}}, sequence=seq, commit=f"{seq:040x}").write(
        tmp_path / f"b{seq}.tar", key)


def conf(root: Path) -> bytes:
    return (root / CONF.lstrip("/")).read_bytes()


@pytest.fixture
def v1(root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> Host:
    host = Host(root)
    host.apply(bundle(tmp_path, signing_key, 1, b"good\n", on_change=(RELOAD,)))
    systemctl.clear()
    return host


def test_check_sees_the_new_tree_and_a_failure_restores_before_any_reload(
        v1: Host, root: Path, tmp_path: Path, signing_key: KeyPair,
        systemctl: Systemctl) -> None:
    before = snapshot(root / "etc")
    # Fails only when the *live* file is the new one: proves it ran after the swap.
    check = f'sh -c "! grep -q broken {{root}}{CONF}"'
    b2 = bundle(tmp_path, signing_key, 2, b"broken\n", check=(check,), on_change=(RELOAD,))
    with pytest.raises(ValidationFailedError, match=r"check .* failed.*before any reload") as e:
        v1.apply(b2)
    assert e.value.exit_code == ExitCode.VALIDATION
    assert systemctl.calls() == []
    assert snapshot(root / "etc") == before
    # Remembered: refused as policy, until --force (which runs the checks again).
    with pytest.raises(BadBundleError, match="apply --force") as refused:
        v1.apply(b2)
    assert refused.value.exit_code == ExitCode.POLICY
    with pytest.raises(ValidationFailedError):
        v1.apply(b2, force=True)
    assert systemctl.calls() == []
    assert snapshot(root / "etc") == before


def test_health_runs_after_reload_and_failure_rolls_back_and_reloads_old(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl) -> None:
    host = Host(root)
    host.apply(bundle(tmp_path, signing_key, 1, b"good\n", on_change=("systemctl reload old",)))
    before = snapshot(root / "etc")
    systemctl.clear()
    # The health check records what the "service" was told before it ran.
    health = Command(f'sh -c "cat {tmp_path}/systemctl.log; exit 1"', timeout=5, retries=2)
    b2 = bundle(tmp_path, signing_key, 2, b"bad\n", on_change=("systemctl reload new",),
                health=(health,))
    with pytest.raises(HealthCheckError, match=r"after 3 attempt\(s\).*rolled back") as e:
        host.apply(b2)
    assert e.value.exit_code == ExitCode.HEALTH
    assert snapshot(root / "etc") == before
    assert conf(root) == b"good\n"
    # Reloaded with the new file, then again after the rollback, old bundle's command first.
    calls = systemctl.calls()
    assert calls[0] == "systemctl reload new"
    assert calls[1:] == ["systemctl reload old", "systemctl reload new"]
    record = host.history()[-1]
    assert record["event"] == "apply"
    assert "health check" in record["result"]
    assert "rolled back" in record["result"]
    ran = [c["run"] for c in record["commands"]]
    assert ran == ["systemctl reload new", health.run, "systemctl reload old",
                   "systemctl reload new"]
    health_record = record["commands"][1]
    assert health_record["attempts"] == 3
    assert "systemctl reload new" in health_record["output"]  # it ran after the reload
    assert host.status()["current"]["sequence"] == 1
    with pytest.raises(BadBundleError):
        host.apply(b2)


def test_health_retries_with_delay_until_it_passes(
        v1: Host, root: Path, tmp_path: Path, signing_key: KeyPair,
        systemctl: Systemctl) -> None:
    count = tmp_path / "count"
    flaky = (f'sh -c "n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); '
             f'echo $n > {count}; test $n -ge 3"')
    b2 = bundle(tmp_path, signing_key, 2, b"v2\n", on_change=(RELOAD,),
                health=(Command(flaky, timeout=5, retries=4, delay=1),))
    start = time.monotonic()
    report = v1.apply(b2)
    assert time.monotonic() - start >= 2  # two failures, one second apart each
    assert [r.attempts for r in report.commands if r.run == flaky] == [3]
    assert conf(root) == b"v2\n"
    assert systemctl.calls() == [RELOAD]


def test_failing_on_change_rolls_back_and_reloads_again(
        v1: Host, root: Path, tmp_path: Path, signing_key: KeyPair,
        systemctl: Systemctl) -> None:
    before = snapshot(root / "etc")
    b2 = bundle(tmp_path, signing_key, 2, b"v2\n", on_change=(RELOAD, "false"))
    with pytest.raises(CommandError, match="on_change 'false' failed") as e:
        v1.apply(b2)
    assert e.value.exit_code == ExitCode.HEALTH
    assert snapshot(root / "etc") == before
    assert systemctl.calls() == [RELOAD, RELOAD]


def test_forced_retry_that_succeeds_is_no_longer_bad(
        v1: Host, root: Path, tmp_path: Path, signing_key: KeyPair,
        systemctl: Systemctl) -> None:
    ready = tmp_path / "upstream-ready"
    b2 = bundle(tmp_path, signing_key, 2, b"v2\n", on_change=(RELOAD,),
                health=(f"test -e {ready}",))
    with pytest.raises(HealthCheckError):
        v1.apply(b2)
    with pytest.raises(BadBundleError):
        v1.apply(b2)
    ready.touch()  # the operator fixed what the bundle depends on
    v1.apply(b2, force=True)
    assert conf(root) == b"v2\n"
    # A re-delivery (watch inbox, timer) of the now-current bundle is a no-op, not a refusal.
    assert v1.apply(b2).noop
    bad = json.loads((root / "var/lib/gitops-apply/bad.json").read_text())
    assert bad == {}


def test_cli_exit_codes_for_health_and_bad_bundle(
        v1: Host, root: Path, tmp_path: Path, signing_key: KeyPair,
        systemctl: Systemctl, capsys: pytest.CaptureFixture[str]) -> None:
    b2 = bundle(tmp_path, signing_key, 2, b"v2\n", on_change=(RELOAD,), health=("false",))
    assert main(["--root", str(root), "apply", str(b2)]) == ExitCode.HEALTH
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "health check 'false' failed" in err
    assert main(["--root", str(root), "apply", str(b2)]) == ExitCode.POLICY
    assert "apply --force" in capsys.readouterr().err
    assert main(["--root", str(root), "apply", "--force", str(b2)]) == ExitCode.HEALTH
    assert conf(root) == b"good\n"


# -- timeouts ------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_timed_out_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    cmd = Command(f'sh -c "sleep 60 & echo $! > {pidfile}; wait"', timeout=1)
    start = time.monotonic()
    result = commands.run(cmd, {})
    assert time.monotonic() - start < 10
    assert not result.ok
    assert result.returncode is None
    assert "timed out after 1s" in result.reason
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), f"sleep {child} survived its command's timeout"


@pytest.mark.parametrize("timeout", [30, 1], ids=["exits", "times-out"])
def test_a_chatty_command_costs_its_last_output_not_all_of_it(timeout: int) -> None:
    """100 MB of output (``nginx -T`` on a big config, a looping health check) is read
    as it comes and only its tail kept: memory stays flat whether it ends or is killed."""
    run = ("sh -c 'head -c 100000000 /dev/zero | tr \\\\0 x; echo; echo the end'" if timeout > 1
           else "sh -c 'while :; do head -c 1000000 /dev/zero | tr \\\\0 y; done'")
    tracemalloc.start()
    try:
        result = commands.run(Command(run, timeout=timeout), {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes held for a command's output"
    assert len(result.output) <= commands.MAX_OUTPUT + 100
    if timeout > 1:
        assert result.ok
        assert result.output.endswith("xxx\nthe end\n")
    else:
        assert "timed out after 1s" in result.reason
        assert "yyyy" in result.output


def test_hanging_validate_fails_the_apply_at_its_timeout(
        v1: Host, root: Path, tmp_path: Path, signing_key: KeyPair,
        systemctl: Systemctl) -> None:
    before = snapshot(root / "etc")
    b2 = bundle(tmp_path, signing_key, 2, b"v2\n", on_change=(RELOAD,),
                validate=(Command("sleep 60", timeout=1),))
    start = time.monotonic()
    with pytest.raises(ValidationFailedError, match=r"validate 'sleep 60' failed.*timed out"):
        v1.apply(b2)
    assert time.monotonic() - start < 10
    assert snapshot(root / "etc") == before
    assert systemctl.calls() == []


def test_hanging_health_check_times_out_each_attempt_and_rolls_back(
        v1: Host, root: Path, tmp_path: Path, signing_key: KeyPair,
        systemctl: Systemctl) -> None:
    b2 = bundle(tmp_path, signing_key, 2, b"v2\n", on_change=(RELOAD,),
                health=(Command("sleep 60", timeout=1, retries=1),))
    start = time.monotonic()
    with pytest.raises(HealthCheckError, match=r"after 2 attempt\(s\).*timed out"):
        v1.apply(b2)
    assert 2 <= time.monotonic() - start < 15
    assert conf(root) == b"good\n"
    assert systemctl.calls() == [RELOAD, RELOAD]
    assert os.path.exists(root / "var/lib/gitops-apply/bad.json")
