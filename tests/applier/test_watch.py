"""Watch mode: bundles dropped into an inbox are taken whole, once, newest first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from applier import watch as watch_module
from applier.apply import Host
from applier.watch import Outcome, Watcher

from factory import BundleSpec, KeyPair

MOTD = "/etc/motd"
DEADLINE = 30.0


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


def bundle(tmp_path: Path, key: KeyPair, seq: int, text: bytes | None = None) -> Path:
    spec = BundleSpec({"frodo": {MOTD: text or f"motd {seq}\n".encode()}}, sequence=seq,
                      commit=f"{seq:040x}")
    return spec.write(tmp_path / f"src-{seq}.tar", key)


def tampered(tmp_path: Path, key: KeyPair, seq: int) -> Path:
    """Signed correctly, then one content byte flipped in the tar."""
    path = bundle(tmp_path, key, seq, b"X" * 4000)
    data = bytearray(path.read_bytes())
    at = data.index(b"X" * 4000)
    data[at + 100] ^= 1
    out = tmp_path / f"tampered-{seq}.tar"
    out.write_bytes(bytes(data))
    return out


def motd(root: Path) -> bytes:
    return (root / "etc/motd").read_bytes()


class Running:
    """A watcher in a thread, with every cycle's outcomes recorded (and when)."""

    def __init__(self, host: Host, inbox: Path, settle: float) -> None:
        self.outcomes: list[tuple[float, Outcome]] = []
        self.lock = threading.Lock()
        self.watcher = Watcher(host, [inbox], settle=settle, on_cycle=self._record)
        self.thread = threading.Thread(target=self.watcher.run, args=(0.05,), daemon=True)

    def _record(self, outcomes: list[Outcome]) -> None:
        with self.lock:
            self.outcomes += [(time.monotonic(), o) for o in outcomes]

    def results(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(o.path.name, o.result) for _, o in self.outcomes]

    def wait_for(self, pred: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; outcomes: {self.results()}")


@pytest.fixture
def running(root: Path, inbox: Path) -> Iterator[Running]:
    r = Running(Host(root), inbox, settle=0.6)
    r.thread.start()
    yield r
    r.watcher.stop.set()
    r.thread.join(DEADLINE)
    assert not r.thread.is_alive()


def slow_copy(src: Path, dst: Path, chunks: int = 8, pause: float = 0.15) -> float:
    """Copy in chunks with pauses, like a slow USB stick; returns when it finished."""
    data = src.read_bytes()
    step = len(data) // chunks + 1
    with dst.open("wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            time.sleep(pause)
    return time.monotonic()


def test_slow_copy_is_applied_once_after_it_completes(
        running: Running, root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    src = bundle(tmp_path, signing_key, 1, b"A" * 200_000)
    done_at: list[float] = []
    copier = threading.Thread(target=lambda: done_at.append(
        slow_copy(src, inbox / "bundle-1.tar")))
    copier.start()
    copier.join(DEADLINE)
    running.wait_for(lambda: ("bundle-1.tar", "applied") in running.results(), "the apply")
    time.sleep(0.5)  # a few more polls: it must not be applied again
    assert running.results() == [("bundle-1.tar", "applied")]
    [(when, _)] = running.outcomes
    assert when > done_at[0]
    assert motd(root) == b"A" * 200_000
    assert [r["event"] for r in Host(root).history()] == ["apply"]
    assert (inbox / "bundle-1.tar").exists()  # left for the next host on the stick


def test_tampered_bundle_is_moved_aside_and_the_next_good_one_applied(
        running: Running, root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair,
        other_key: KeyPair) -> None:
    (inbox / "bad.tar").write_bytes(tampered(tmp_path, signing_key, 2).read_bytes())
    (inbox / "bad.tar.done").touch()
    running.wait_for((inbox / "rejected" / "bad.tar").exists, "the rejection")
    reason = (inbox / "rejected" / "bad.tar.reason").read_text()
    assert "SHA-256" in reason
    assert "frodo" in reason
    assert not (inbox / "bad.tar").exists()
    assert not (inbox / "bad.tar.done").exists()
    # Signed by a key this host does not trust: rejected too, and the loop goes on.
    (inbox / "mallory.tar").write_bytes(bundle(tmp_path, other_key, 5).read_bytes())
    (inbox / "mallory.tar.done").touch()
    running.wait_for((inbox / "rejected" / "mallory.tar.reason").exists,
                     "the second rejection")
    (inbox / "good.tar").write_bytes(bundle(tmp_path, signing_key, 3).read_bytes())
    running.wait_for(lambda: ("good.tar", "applied") in running.results(), "the good one")
    assert motd(root) == b"motd 3\n"
    assert running.results() == [("bad.tar", "rejected"), ("mallory.tar", "rejected"),
                                 ("good.tar", "applied")]


def test_newest_of_several_is_applied_older_skipped(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    for seq in (1, 3, 2):
        (inbox / f"b{seq}.tar").write_bytes(bundle(tmp_path, signing_key, seq).read_bytes())
        (inbox / f"b{seq}.tar.done").touch()
    watcher = Watcher(Host(root), [inbox], settle=0.0)
    outcomes = {o.path.name: (o.result, o.reason) for o in watcher.run(0.05, once=True)}
    assert outcomes["b3.tar"][0] == "applied"
    assert outcomes["b2.tar"] == ("skipped",
                                  f"superseded by {Host(root).state.current().bundle_id}")
    assert outcomes["b1.tar"][0] == "skipped"
    assert motd(root) == b"motd 3\n"
    # Nothing is tried again, by this watcher or the next one.
    assert watcher.poll() == []
    assert Watcher(Host(root), [inbox], settle=0.0).run(0.05, once=True) == []


def test_read_only_inbox_keeps_the_reason_in_the_state_dir(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    # Root may write anywhere, so make the move impossible another way.
    (inbox / "rejected").write_text("not a directory")
    (inbox / "bad.tar").write_bytes(tampered(tmp_path, signing_key, 2).read_bytes())
    (inbox / "bad.tar.done").touch()
    [o] = Watcher(Host(root), [inbox], settle=0.0).run(0.05, once=True)
    assert o.result == "rejected"
    assert (inbox / "bad.tar").exists()
    reason = root / "var/lib/gitops-apply/watch/rejected/bad.tar.reason"
    assert "SHA-256" in reason.read_text()
    assert Watcher(Host(root), [inbox], settle=0.0).run(0.05, once=True) == []


def test_settle_zero_takes_a_bundle_without_done_marker_at_once(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    (inbox / "b1.tar").write_bytes(bundle(tmp_path, signing_key, 1).read_bytes())
    [o] = Watcher(Host(root), [inbox], settle=0.0).run(0.05, once=True)
    assert o.result == "applied"
    assert motd(root) == b"motd 1\n"


def test_missing_inbox_is_waited_for(root: Path, tmp_path: Path) -> None:
    assert Watcher(Host(root), [tmp_path / "not-mounted"], settle=0.0).run(
        0.05, once=True) == []


def cli(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "applier.cli", "--root", str(root), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_once_and_sigterm(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    (inbox / "b1.tar").write_bytes(bundle(tmp_path, signing_key, 1).read_bytes())
    (inbox / "b1.tar.done").touch()
    metrics = tmp_path / "gitops.prom"
    out, err = cli(root, "watch", "--once", "--json", "--metrics-file", str(metrics),
                   str(inbox)).communicate(timeout=DEADLINE)
    [o] = json.loads(out)
    assert o["result"] == "applied", err
    assert "gitops_bundle_sequence" in metrics.read_text()
    out, _ = cli(root, "watch", "--once", str(inbox)).communicate(timeout=DEADLINE)
    assert "nothing new" in out
    # The long-running form stops cleanly on SIGTERM.
    proc = cli(root, "watch", "--interval", "0.1", str(inbox))
    assert proc.stderr is not None
    assert "watching" in proc.stderr.readline()  # the handler is installed by then
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    assert "stopping" in err
    assert os.path.exists(inbox / "b1.tar")


def test_junk_names_on_the_stick_do_not_stop_a_good_bundle(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """A name too long to take '.done' or '.reason', and one that is not UTF-8: each
    is dealt with on its own, and the genuine bundle beside them is applied."""
    (inbox / "good-2.tar").write_bytes(bundle(tmp_path, signing_key, 2).read_bytes())
    (inbox / ("z" * 251 + ".tar")).write_bytes(b"not a bundle")
    with open(os.fsencode(inbox) + b"/junk-\xff.tar", "wb") as f:
        f.write(b"not a bundle either")
    for settle in ("5", "0"):  # .done probed (settle 5) / taken at once (settle 0)
        proc = subprocess.run([sys.executable, "-m", "applier.cli", "--root", str(root),
                               "watch", "--once", "--settle", settle, "--interval", "0.1",
                               str(inbox)], capture_output=True, text=True,
                              timeout=DEADLINE, check=False)
        assert proc.returncode == 0, proc.stderr
    assert motd(root) == b"motd 2\n"
    rejected = sorted(p.name for p in (inbox / "rejected").iterdir())
    assert [n for n in rejected if n.endswith(".reason")] == [
        n for n in rejected if n.startswith(("junk-\\udcff.tar-", "z" * 100 + "-"))], rejected
    assert len(rejected) == 4, rejected
    assert Watcher(Host(root), [inbox], settle=0.0).run(0.05, once=True) == []


def test_a_rejected_directory_that_is_a_symlink_is_never_followed(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "nightly.tar.gz").write_bytes(b"backup\n")
    (inbox / "rejected").symlink_to(victim)
    (inbox / "nightly.tar.gz").write_bytes(tampered(tmp_path, signing_key, 2).read_bytes())
    [o] = Watcher(Host(root), [inbox], settle=0.0).run(0.05, once=True)
    assert o.result == "rejected"
    assert sorted(p.name for p in victim.iterdir()) == ["nightly.tar.gz"]
    assert (victim / "nightly.tar.gz").read_bytes() == b"backup\n"
    assert (inbox / "nightly.tar.gz").exists()
    assert (root / "var/lib/gitops-apply/watch/rejected/nightly.tar.gz.reason").exists()


def test_a_long_running_watch_reads_config_changes(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """The operator raises the threshold after a key leak: a bundle with one signature
    is refused by the watcher already running, as by the command line."""
    watcher = Watcher(Host(root), [inbox], settle=0.0)
    (inbox / "b1.tar").write_bytes(bundle(tmp_path, signing_key, 1).read_bytes())
    [o] = watcher.poll()
    assert o.result == "applied"
    config = root / "etc/gitops-apply/config.yaml"
    config.write_text(config.read_text().replace("threshold: 1", "threshold: 2"))
    (inbox / "b2.tar").write_bytes(bundle(tmp_path, signing_key, 2).read_bytes())
    [o] = watcher.poll()
    assert o.result == "rejected", o
    assert "2 required" in o.reason
    assert motd(root) == b"motd 1\n"


def test_the_ledger_forgets_only_files_that_are_gone(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """More bundle files than the ledger keeps: forgetting one still on the stick would
    have it verified and recorded again at every poll."""
    monkeypatch.setattr(watch_module, "MAX_SEEN", 3)
    for seq in range(1, 6):
        (inbox / f"b{seq}.tar").write_bytes(bundle(tmp_path, signing_key, seq).read_bytes())
    watcher = Watcher(Host(root), [inbox], settle=0.0)
    assert len(watcher.poll()) == 5
    assert watcher.poll() == []
    for seq in range(1, 5):
        (inbox / f"b{seq}.tar").unlink()
    (inbox / "b6.tar").write_bytes(bundle(tmp_path, signing_key, 6).read_bytes())
    [o] = watcher.poll()
    assert o.result == "applied"
    seen = json.loads((root / "var/lib/gitops-apply/watch/seen.json").read_bytes())
    names = {Path(k.split("|")[0]).name for k in seen}
    assert {"b5.tar", "b6.tar"} <= names  # still on the stick: never forgotten
    assert len(names) == 3  # gone ones dropped down to MAX_SEEN
    assert watcher.poll() == []


def test_the_ledger_keeps_one_entry_for_a_name_the_stick_reuses(
        root: Path, inbox: Path, tmp_path: Path, signing_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "MAX_SEEN", 3)
    watcher = Watcher(Host(root), [inbox], settle=0.0)
    for seq in range(1, 7):
        latest = inbox / "latest.tar"
        latest.write_bytes(bundle(tmp_path, signing_key, seq).read_bytes())
        os.utime(latest, ns=(seq * 10**9, seq * 10**9))
        [o] = watcher.poll()
        assert o.result == "applied"
    seen = json.loads((root / "var/lib/gitops-apply/watch/seen.json").read_bytes())
    assert len(seen) <= 3
