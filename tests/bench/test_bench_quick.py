"""Smoke test for the benchmark: ``bench/run --quick`` runs end to end and writes its table.

No timing assertions: speed is shown by ``bench/run`` and ``bench/results.md``, never
asserted in tests. This only keeps the benchmark from rotting as the tools change.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.measure import run

from conftest import REPO_ROOT, require_tool


def test_bench_quick_writes_results(tmp_path: Path) -> None:
    """The CI smoke scale (one timed run per step, no warm-up, no Ansible: about a
    minute), so every step of the full benchmark runs on every change."""
    require_tool("git")
    require_tool("ssh-keygen")
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "run"), "--quick", "--repeats", "1",
         "--warmup", "0", "--no-ansible", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for heading in ("## Machine", "## Results", "## Targets (issue 6)", "## Commands run"):
        assert heading in text
    for workload in ("examples", "fleet", "big"):
        assert f"| {workload} | first apply |" in text
        assert f"| {workload} | re-apply, nothing changed |" in text
    assert "| fleet | build | " in text
    # The fleet host's steps again from a bundle built for it alone (build --host).
    for step in ("verify", "first apply", "re-apply, nothing changed"):
        assert f"| fleet | {step} (one-host bundle) |" in text
    assert "CPU:" in text
    # Measured as a host runs it: our wheel installed into a venv of its own (building
    # it needs what scripts/test's own install needs), not the checkout.
    assert "- tool measured: our wheel" in text
    # The generated repos and roots are cleaned up; only the results and keys remain.
    assert not (tmp_path / "work" / "big-repo").exists()


def gone(pid: int) -> bool:
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):  # dead, waiting for its new parent to reap it
            return True
        time.sleep(0.1)
    return False


def test_a_capped_command_is_killed_with_the_sessions_below_it(tmp_path: Path) -> None:
    """Ansible's workers call setsid: at the cap they go too, not just the launcher."""
    pids = tmp_path / "pids"
    script = ("import os, time\n"
              "if os.fork() == 0:\n"
              "    os.setsid()\n"
              f"    open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
              "    time.sleep(60)\n"
              "    os._exit(0)\n"
              "os.setsid()\n"
              f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
              "time.sleep(60)\n")
    sample = run([sys.executable, "-c", script], timeout=2)
    assert sample.timed_out
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    assert [p for p in started if not gone(p)] == []
