"""Crash matrix: SIGKILL the applier at every durable step, recover, check all-or-nothing.

After SQLite's crash tests: the apply runs once with ``GITOPS_FAULT_LOG`` to list its
fault points (applier/_faults.py), then once per point N with ``GITOPS_FAULT_AT=N``,
which kills it with SIGKILL exactly there. Recovery then runs (``recover``, or a plain
``status`` / ``apply``, which must recover first), and the root must be byte-for-byte
(content, mode, owner, directories) the old bundle's or the new bundle's, with the
state saying which, no ``.gitops-*`` leftovers, and services last told about the files
that are on disk. Recovery is itself crashed at each of its points and run again.
Counts (printed by the tests): 51 apply points x 3 recovery paths, 483 crashes inside
recovery, 45 points of a ``rollback`` command, 44 of a health-failure rollback.

Speed: hundreds of CLI runs. Each one is a real process killed by a real SIGKILL, but
it is forked from a "zygote" that imported ``applier.cli`` once (the import costs
~0.3 s; a fork ~5 ms). A few runs go through the installed ``gitops-apply`` script to
show it behaves the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from applier.apply import init_host

from factory import BundleSpec, FileSpec, KeyPair, snapshot, write_allowed_signers

STATE = "var/lib/gitops-apply"
KILLED = -signal.SIGKILL
IS_ROOT = os.geteuid() == 0
# The crash matrix must keep covering at least this many distinct steps of an apply.
MIN_APPLY_POINTS = 40

# Forks one child per request; the child runs the CLI's main() with the request's argv
# and environment, its stdout/stderr in a file. Answers with the child's exit status.
ZYGOTE = r"""
import json, os, sys
from applier.cli import main
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(req["env"])
        fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = main(req["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    sys.stdout.flush()
"""


class Zygote:
    """One pre-imported interpreter that forks a fresh CLI process per request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lock = threading.Lock()

    def run(self, argv: list[str], env: dict[str, str], out: Path) -> int:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        with self.lock:
            self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "out": str(out)})
                                  + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        assert answer, "zygote died"
        return int(json.loads(answer))

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


class Runner:
    """Runs ``gitops-apply`` against a root, optionally crashing it at fault point N."""

    def __init__(self, zygotes: list[Zygote]) -> None:
        self.zygotes = zygotes
        self._local = threading.local()
        self._next = 0
        self._pick = threading.Lock()
        self.runs = 0

    def _zygote(self) -> Zygote:
        z: Zygote | None = getattr(self._local, "zygote", None)
        if z is None:
            with self._pick:
                z = self.zygotes[self._next % len(self.zygotes)]
                self._next += 1
            self._local.zygote = z
        return z

    def __call__(self, root: Path, *args: str, at: int | None = None,
                 log: Path | None = None, real: bool = False) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_FAULT")}
        if at is not None:
            env["GITOPS_FAULT_AT"] = str(at)
        if log is not None:
            env["GITOPS_FAULT_LOG"] = str(log)
        out = root.parent / "out.txt"
        argv = ["--root", str(root), *args]
        self.runs += 1
        if real:
            proc = subprocess.run(["gitops-apply", *argv], env=env, capture_output=True,
                                  text=True, check=False)
            return proc.returncode, proc.stdout + proc.stderr
        code = self._zygote().run(argv, env, out)
        return code, out.read_text(errors="replace")


@pytest.fixture(scope="module")
def run() -> Iterator[Runner]:
    zygotes = [Zygote() for _ in range(max(1, min(4, os.cpu_count() or 1)))]
    try:
        yield Runner(zygotes)
    finally:
        for z in zygotes:
            z.close()


# -- the scenario: an apply that adds, changes and removes files ------------------------

# on_change "reloads the service": records which change.conf it saw, so a test can tell
# whether services were last told about the files that ended up on disk.
RELOAD = 'sh -c "cat {root}/etc/app/change.conf >> {root}/../reloads.log"'


def _files(version: int, health: str = "true") -> dict[str, bytes | FileSpec]:
    def f(content: bytes, mode: int = 0o644, owner: str = "root") -> FileSpec:
        return FileSpec(content, mode=mode, owner=owner, group=owner, on_change=(RELOAD,),
                        health=(health,) if version > 1 else ())

    if version == 1:
        return {
            "/etc/app/keep.conf": f(b"unchanged\n"),
            "/etc/app/change.conf": f(b"change v1\n"),
            "/etc/app/mode.conf": f(b"mode\n", 0o644),
            "/etc/app/owner.conf": f(b"owner v1\n"),
            "/etc/app/gone.conf": f(b"removed by v2\n"),
        }
    # owner changes need root; otherwise the content changes instead.
    return {
        "/etc/app/keep.conf": f(b"unchanged\n"),
        "/etc/app/change.conf": f(b"change v2, a little longer\n"),
        "/etc/app/mode.conf": f(b"mode\n", 0o600),
        "/etc/app/owner.conf": f(b"owner v1\n", owner="65534") if IS_ROOT
        else f(b"owner v2\n"),
        "/etc/app/new.conf": f(b"added by v2\n", 0o640),
        "/etc/newdir/sub/added.conf": f(b"added in a new directory\n"),
    }


@dataclass
class World:
    tmp: Path
    v1: Path  # bundles
    v2: Path
    bad: Path  # v2's files with a failing health check
    v1_root: Path  # template roots (copied per run with cp -a: owners survive)
    v2_root: Path
    old: dict[str, Any]  # snapshots of the managed tree
    new: dict[str, Any]
    rolled_back: dict[str, Any]  # v2 then `rollback`: v1's files, v2's empty dirs stay
    ids: dict[str, str]


def managed(root: Path) -> dict[str, Any]:
    """Snapshot of everything under root but the tool's state."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith(STATE)}


def copy_root(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(src), str(dst_dir / "root")], check=True)
    for log in src.parent.glob("reloads.log"):
        shutil.copy2(log, dst_dir / log.name)
    return dst_dir / "root"


def current_id(root: Path) -> str | None:
    """What the state says is applied (read directly: a process per check is too slow)."""
    try:
        return str(json.loads((root / STATE / "current.json").read_bytes())["bundle_id"])
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs when there is one: hundreds of roots, each fsynced a few dozen times."""
    if os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="gitops-crash-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def world(scratch: Path, signing_key: KeyPair, run: Runner) -> World:
    tmp = scratch
    signers = write_allowed_signers(tmp / "allowed_signers", signing_key)
    s1 = BundleSpec({"frodo": _files(1)}, sequence=1, commit="1" * 40)
    s2 = BundleSpec({"frodo": _files(2)}, sequence=2, commit="2" * 40)
    s3 = BundleSpec({"frodo": _files(2, health="false")}, sequence=3, commit="3" * 40)
    v1, v2, bad = (s.write(tmp / f"{n}.tar", signing_key)
                   for n, s in (("v1", s1), ("v2", s2), ("bad", s3)))

    (tmp / "t1").mkdir()
    v1_root = tmp / "t1/root"
    init_host(v1_root, "frodo", signers)
    code, out = run(v1_root, "apply", str(v1))
    assert code == 0, out
    v2_root = copy_root(v1_root, tmp / "t2")
    code, out = run(v2_root, "apply", str(v2))
    assert code == 0, out
    rb_root = copy_root(v2_root, tmp / "t3")
    code, out = run(rb_root, "rollback")
    assert code == 0, out
    return World(tmp, v1, v2, bad, v1_root, v2_root, managed(v1_root), managed(v2_root),
                 managed(rb_root), {"v1": s1.manifest().bundle_id,
                                    "v2": s2.manifest().bundle_id})


def fault_points(run: Runner, root: Path, *args: str) -> list[str]:
    """The names of the fault points one run passes, in order (the run is discarded)."""
    probe = copy_root(root, root.parent.parent / f"probe-{os.urandom(4).hex()}")
    log = probe.parent / "faults.log"
    run(probe, *args, log=log)
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split(" ", 1)[1] for line in lines]


def retained_ids(root: Path) -> set[str]:
    """Every directory under the state's bundles/, complete or not."""
    return {p.name for p in (root / STATE / "bundles").iterdir()}


def check_consistent(run: Runner, w: World, root: Path, allowed: dict[str, dict[str, Any]],
                     label: str, template: Path) -> str:
    """The root is exactly one allowed state, the state agrees, services saw it too.

    ``template`` is the root the crashed command started from: the bundles retained
    now are its own plus the one now current, and no other (a bundle rolled back by
    recovery is not kept as if it had been applied).
    """
    assert not (root / STATE / "journal.json").exists(), f"{label}: journal left behind"
    got = managed(root)
    leftovers = [p for p in got if "/.gitops-" in "/" + p]
    assert not leftovers, f"{label}: leftovers {leftovers}"
    matches = [name for name, snap in allowed.items() if got == snap]
    if not matches:
        closest = min(allowed, key=lambda n: len(set(got.items()) ^ set(allowed[n].items())))
        diff = sorted(set(got.items()) ^ set(allowed[closest].items()))
        pytest.fail(f"{label}: root is a mix (nearest {closest}); differs in {diff}")
    which = matches[0]
    temps = [p.name for p in (root / STATE).rglob(".*.tmp-*")]
    assert not temps, f"{label}: state temp files left: {temps}"
    assert not any((root / STATE / "staging").iterdir()), f"{label}: staging not cleaned"
    expected_id = w.ids["v2"] if which == "new" else w.ids["v1"]
    assert current_id(root) == expected_id, f"{label}: files are {which}, state is not"
    assert retained_ids(root) == retained_ids(template) | {expected_id}, \
        f"{label}: retained {sorted(retained_ids(root))}, current {expected_id}"
    reloads = root.parent / "reloads.log"
    if reloads.exists() and reloads.read_bytes():
        last = reloads.read_bytes().splitlines(keepends=True)[-1]
        assert last == (root / "etc/app/change.conf").read_bytes(), \
            f"{label}: services were last told about other files than those on disk"
    return which


def crash(run: Runner, w: World, template: Path, n: int, where: Path,
          args: tuple[str, ...]) -> Path:
    root = copy_root(template, where)
    (root.parent / "reloads.log").unlink(missing_ok=True)
    code, out = run(root, *args, at=n)
    assert code == KILLED, f"point {n}: expected SIGKILL, got {code}: {out}"
    return root


def parallel(jobs: list[Callable[[], str]]) -> list[str]:
    workers = len(jobs) and max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers or 1) as pool:
        return list(pool.map(lambda job: job(), jobs))


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        sys.stderr.write(f"\n[crash matrix] {text}\n")


# -- the tests -----------------------------------------------------------------------


def test_scenario_adds_changes_removes_and_the_states_differ(world: World) -> None:
    old, new = world.old, world.new
    assert "etc/app/gone.conf" in old
    assert "etc/app/gone.conf" not in new
    assert "etc/app/new.conf" in new
    assert "etc/newdir" in new
    assert "etc/newdir" not in old
    assert old["etc/app/mode.conf"][0] & 0o777 == 0o644
    assert new["etc/app/mode.conf"][0] & 0o777 == 0o600
    assert old["etc/app/change.conf"] != new["etc/app/change.conf"]
    if IS_ROOT:
        assert new["etc/app/owner.conf"][1:3] == (65534, 65534)


def test_every_crash_point_of_an_apply_recovers_to_old_or_new(
        world: World, run: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    w = world
    points = fault_points(run, w.v1_root, "apply", str(w.v2))
    assert len(points) >= MIN_APPLY_POINTS, points
    for step in ("journal-prepared:synced", "mkdir", "stage-created", "stage-file", "backup",
                 "remove", "rename", "journal-services:synced", "current:renamed",
                 "drop-backup", "journal-removed"):
        assert step in points, f"no fault point {step}: {points}"
    allowed = {"old": w.old, "new": w.new}
    # Every point is recovered three ways: explicitly, by a read-only command, and by
    # the next apply (which must then finish the job).
    modes = ("recover", "status", "apply")

    def one(n: int, mode: str) -> Callable[[], str]:
        def job() -> str:
            root = crash(run, w, w.v1_root, n, w.tmp / f"apply-{n}-{mode}",
                         ("apply", str(w.v2)))
            args = {"recover": ("recover",), "status": ("status",),
                    "apply": ("apply", str(w.v2))}[mode]
            code, out = run(root, *args)
            assert code == 0, f"point {n} ({points[n - 1]}) {mode}: {out}"
            which = check_consistent(run, w, root, allowed, f"point {n} ({points[n - 1]}) "
                                     f"then {mode}", w.v1_root)
            if mode == "apply":
                assert which == "new", f"point {n}: apply after the crash did not finish"
            return which

        return job

    results = parallel([one(n, mode) for n in range(1, len(points) + 1) for mode in modes])
    outcomes = {r: results.count(r) for r in set(results)}
    assert set(outcomes) == {"old", "new"}, outcomes
    report(capsys, f"apply: {len(points)} crash points, each recovered by "
                   f"{', '.join(modes)}; outcomes {outcomes}")


# Every recovery point is crashed after every apply step (about 500 runs, ~15 s on an
# idle 2-CPU machine). GITOPS_CRASH_QUICK=1 samples for a loaded laptop: every recovery
# point only after the deepest step of each phase (DEEP), one in turn after the others.
DEEP = ("stage-file", "backups-synced", "rename", "swap-synced", "journal-services:synced",
        "retain-meta:synced", "current:renamed", "drop-backup")


def test_crash_during_recovery_then_recover_again(
        world: World, run: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    w = world
    points = fault_points(run, w.v1_root, "apply", str(w.v2))
    allowed = {"old": w.old, "new": w.new}
    full = os.environ.get("GITOPS_CRASH_QUICK") != "1"
    # The last point of each DEEP name: the most changed state of that phase.
    deep = {max(i + 1 for i, p in enumerate(points) if p == name) for name in DEEP}

    def job(n: int) -> str:
        crashed = crash(run, w, w.v1_root, n, w.tmp / f"rc-{n}", ("apply", str(w.v2)))
        if not (crashed / STATE / "journal.json").exists():
            return "0"
        rpoints = fault_points(run, crashed, "recover")
        chosen = (range(1, len(rpoints) + 1) if full or n in deep
                  else [1 + n % len(rpoints)])
        for m in chosen:
            root = copy_root(crashed, w.tmp / f"rc-{n}-{m}")
            code, out = run(root, "recover", at=m)
            assert code == KILLED, f"recovery point {m} ({rpoints[m - 1]}): {out}"
            code, out = run(root, "recover")
            assert code == 0, out
            check_consistent(run, w, root, allowed, f"apply point {n} ({points[n - 1]}), "
                             f"recovery point {m} ({rpoints[m - 1]})", w.v1_root)
        return str(len(chosen))

    counts = [int(c) for c in parallel([partial(job, n) for n in range(1, len(points) + 1)])]
    total = sum(counts)
    assert total >= (300 if full else 80), counts
    how = ("every recovery point after every apply step" if full else
           f"every recovery point after {len(deep)} apply steps, one after each other")
    report(capsys, f"recovery: {total} crashes inside recovery ({how}), each recovered again")


def test_every_crash_point_of_a_rollback_command(
        world: World, run: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    w = world
    points = fault_points(run, w.v2_root, "rollback")
    assert len(points) >= 20, points
    allowed = {"new": w.new, "old": w.rolled_back}

    def job(n: int) -> str:
        root = crash(run, w, w.v2_root, n, w.tmp / f"rb-{n}", ("rollback",))
        code, out = run(root, "recover")
        assert code == 0, out
        return check_consistent(run, w, root, allowed, f"rollback point {n} ({points[n - 1]})",
                                w.v2_root)

    results = parallel([partial(job, n) for n in range(1, len(points) + 1)])
    assert set(results) == {"old", "new"}
    report(capsys, f"rollback command: {len(points)} crash points")


def test_every_crash_point_of_a_health_failure_rollback(
        world: World, run: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    """The automatic rollback after a failed health check, crashed anywhere: old files,
    services told about them, and the bundle is never applied half-way."""
    w = world
    points = fault_points(run, w.v1_root, "apply", str(w.bad))
    assert "restore" in points
    assert "journal-services:synced" in points
    allowed = {"old": w.old}

    def job(n: int) -> str:
        root = crash(run, w, w.v1_root, n, w.tmp / f"hf-{n}", ("apply", str(w.bad)))
        code, out = run(root, "recover")
        assert code == 0, out
        return check_consistent(run, w, root, allowed, f"health-rollback point {n} "
                                f"({points[n - 1]})", w.v1_root)

    parallel([partial(job, n) for n in range(1, len(points) + 1)])
    report(capsys, f"health-failure rollback: {len(points)} crash points")


def test_installed_script_crashes_and_recovers_the_same_way(world: World, run: Runner) -> None:
    """The zygote is a shortcut: the console script dies and recovers identically."""
    w = world
    points = fault_points(run, w.v1_root, "apply", str(w.v2))
    for name in ("rename", "journal-services:synced"):
        n = points.index(name) + 1
        root = copy_root(w.v1_root, w.tmp / f"real-{n}")
        code, _ = run(root, "apply", str(w.v2), at=n, real=True)
        assert code == KILLED
        code, out = run(root, "recover", real=True)
        assert code == 0, out
        assert "rolled back" in out
        check_consistent(run, w, root, {"old": w.old}, f"real script, point {n}", w.v1_root)


def test_recovery_follows_the_root_when_it_moves(world: World, run: Runner) -> None:
    """A host recovered from a rescue system sees its root under another mount point:
    the journal names host paths, so recovery acts there and nowhere else."""
    w = world
    points = fault_points(run, w.v1_root, "apply", str(w.v2))
    n = max(i + 1 for i, p in enumerate(points) if p == "rename")
    root = crash(run, w, w.v1_root, n, w.tmp / "moved-from", ("apply", str(w.v2)))
    moved = w.tmp / "moved-to"
    moved.mkdir()
    os.rename(root, moved / "root")
    root.mkdir()  # something else now lives at the old place: it must not be touched
    code, out = run(moved / "root", "recover")
    assert code == 0, out
    check_consistent(run, w, moved / "root", {"old": w.old}, "moved root", w.v1_root)
    assert list(root.iterdir()) == []
