"""``bench/run``: generate the workloads, measure every step beside its peer, write the table.

For: the command line (scale, repeats, work dir, Ansible on/off), installing
ansible-core into its own venv, checking disk space, and cleaning up. The work dir
(default ``bench/work/``, gitignored) holds the generated repos, bundles and host
roots; each workload's files are removed when it is done. Not for: the steps
themselves (steps.py) or the table (report.py).
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from bench import report, steps, workloads
from bench.measure import BenchError
from bench.steps import Config, Row, WorkloadBench

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORK = BENCH_DIR / "work"
DEFAULT_OUT = BENCH_DIR / "results.md"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="small scale (CI smoke test)")
    scale.add_argument("--tiny", action="store_true", help="smallest scale (unit test)")
    p.add_argument("--repeats", type=int, help="timed runs per step (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed runs before them (default 1)")
    p.add_argument("--heavy-repeats", type=int,
                   help="timed runs for the big workload (default 3)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch directory")
    p.add_argument("--out", type=Path, help="results file (default bench/results.md; "
                                            "with --quick/--tiny: WORK/results.md)")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--workloads", default="examples,fleet,big",
                   help="comma-separated subset of examples,fleet,big")
    p.add_argument("--ansible", action=argparse.BooleanOptionalAction, default=None,
                   help="compare with ansible-playbook (default: on, off with --quick)")
    p.add_argument("--ansible-cap", type=float, default=150.0,
                   help="stop an Ansible run after this many seconds (lower bound)")
    p.add_argument("--ansible-repeats", type=int,
                   help="timed Ansible runs per step, after one warm-up (default: as "
                        "--repeats); a run stopped at the cap is the only one")
    p.add_argument("--ansible-big", action="store_true",
                   help="also run Ansible on the big workload (hours at full scale)")
    p.add_argument("--big-mib", type=int,
                   help="total size of the big workload (default 1024 at full scale)")
    p.add_argument("--keep", action="store_true", help="keep generated repos and roots")
    return p.parse_args(argv)


def ensure_ansible(venv: Path) -> tuple[Path | None, str]:
    """ansible-playbook from its own venv, installed with pip on first use."""
    playbook = venv / "bin" / "ansible-playbook"
    if not playbook.exists():
        print(f"installing ansible-core into {venv} ...", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "ansible-core"],
                           check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            return None, f"Ansible skipped: installing ansible-core failed ({e})"
    version = subprocess.run([str(venv / "bin" / "ansible"), "--version"],
                             capture_output=True, text=True, check=False).stdout
    return playbook, (version.splitlines() or ["ansible ?"])[0]


def install_tool(work: Path) -> tuple[list[str], list[str], str, str]:
    """Install our wheel into a venv of its own, as ``install-from-usb`` does on a host.

    A host runs the installed tool: modules from site-packages, bytecode written by pip.
    A development checkout's editable install instead imports a finder module at every
    interpreter start (about 20 ms), and under PYTHONDONTWRITEBYTECODE (set in some CI
    images) it compiles every module on every command (about 0.1 s); neither is the
    user's cost. The dependencies come from the running environment through a ``.pth``
    line, so nothing is downloaded but what building the wheel needs (as
    ``scripts/test``'s install). If the wheel cannot be built, the checkout's own
    commands are measured, precompiled, and the results say so.

    Returns the ``gitops-bundle`` and ``gitops-apply`` commands, their interpreter and
    a line for the results' settings.
    """
    venv = work / "tool-venv"
    wheels = work / "tool-wheel"
    for d in (venv, wheels):
        shutil.rmtree(d, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    try:
        subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels),
                        str(BENCH_DIR.parent)], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                       check=True, capture_output=True)
        site = Path(subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip())
        ours = sysconfig.get_paths()
        (site / "_bench_dependencies.pth").write_text(
            "".join(f"{p}\n" for p in dict.fromkeys((ours["purelib"], ours["platlib"]))))
        # --ignore-installed: the running environment's editable install is visible
        # through the .pth line and must be neither taken as this one nor removed.
        subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install",
                        "--no-deps", "--no-index", "--ignore-installed",
                        *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        last = (err.decode(errors="replace").strip().splitlines() or [str(e)])[-1]
        print(f"bench: cannot install the wheel ({last}); measuring the checkout",
              file=sys.stderr, flush=True)
        root = BENCH_DIR.parent
        for package in ("applier", "bundler"):
            compileall.compile_dir(str(root / package), quiet=1)
        bundle_cmd, apply_cmd = steps.dev_tools()
        return bundle_cmd, apply_cmd, sys.executable, (
            f"the checkout's commands, precompiled (building the wheel failed: {last})")
    bin_dir = venv / "bin"
    return ([str(bin_dir / "gitops-bundle")], [str(bin_dir / "gitops-apply")],
            str(bin_dir / "python"),
            ("our wheel, built from this tree and installed into a venv of its own, as a "
             "host has it (bytecode written by pip)"))


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    scale = workloads.SCALES[mode]
    if args.big_mib:
        scale = workloads.resize_big(scale, args.big_mib)
    repeats = args.repeats or {"full": 5, "quick": 2, "tiny": 1}[mode]
    warmup = args.warmup if args.warmup is not None else (0 if mode == "tiny" else 1)
    heavy = args.heavy_repeats or min(repeats, 3)
    # The big workload's runs take minutes each; its first run is its own warm-up.
    heavy_warmup = 0 if mode == "full" else warmup
    out = args.out or (DEFAULT_OUT if mode == "full" else args.work / "results.md")
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    started = time.monotonic()
    notes: list[str] = []

    use_ansible = args.ansible if args.ansible is not None else mode == "full"
    playbook: Path | None = None
    ansible_version = "not used"
    if use_ansible:
        playbook, ansible_version = ensure_ansible(DEFAULT_WORK / "ansible-venv")
        if playbook is None:
            notes.append(ansible_version)
    elif mode != "full":
        notes.append("Ansible not run at this scale (pass --ansible to include it)")

    ansible_repeats = args.ansible_repeats or repeats
    cfg = Config(work=work, repeats=repeats, warmup=warmup, heavy_repeats=heavy,
                 ansible=playbook, ansible_cap=args.ansible_cap,
                 ansible_repeats=ansible_repeats)
    steps.prepare(cfg)
    cfg.bundle_cmd, cfg.apply_cmd, cfg.python, installed = install_tool(work)
    info = report.machine(work)
    info["load average at start"] = " ".join(f"{x:.2f}" for x in _loadavg())
    print(f"bench: {mode} scale, {repeats} timed runs (big: {heavy}) after {warmup} "
          f"warm-up, work dir {work}", flush=True)

    rows: list[Row] = []
    described: dict[str, str] = {}
    sizes: dict[str, dict[str, int]] = {}
    for name in wanted:
        reps = heavy if name == "big" else repeats
        changes = (heavy_warmup if name == "big" else warmup) + reps
        if name == "big":
            need = workloads.big_disk_need(scale)
            free = shutil.disk_usage(work).free
            if free < need:
                notes.append(f"big skipped: {free >> 20} MiB free in {work}, needs about "
                             f"{need >> 20} MiB")
                continue
        print(f"bench: generating {name} ...", flush=True)
        t0 = time.monotonic()
        if name == "fleet":
            wl = workloads.make_fleet(work, scale, args.seed, changes)
        elif name == "big":
            wl = workloads.make_big(work, scale, args.seed, changes)
        elif name == "examples":
            wl = workloads.make_examples(work, args.seed, changes)
        else:
            print(f"bench/run: unknown workload {name!r}", file=sys.stderr)
            return 2
        print(f"bench: generated {name} in {time.monotonic() - t0:.1f} s", flush=True)
        described[name] = wl.description
        cfg.ansible = playbook if (name != "big" or args.ansible_big) else None
        if playbook is not None and cfg.ansible is None:
            notes.append("Ansible not run on big: at the per-file cost measured on fleet it "
                         "would take hours for 10,000 files (--ansible-big runs it)")
        bench = WorkloadBench(cfg, wl, heavy=name == "big", heavy_warmup=heavy_warmup)
        try:
            rows += bench.run_all()
        except BenchError as e:
            print(f"bench/run: {name}: {e}", file=sys.stderr)
            return 1
        sizes[name] = bench.sizes
        if not args.keep:
            shutil.rmtree(bench.dir, ignore_errors=True)
            shutil.rmtree(wl.repo, ignore_errors=True)

    elapsed = time.monotonic() - started
    info["load average at end"] = " ".join(f"{x:.2f}" for x in _loadavg())
    settings = {"mode": mode, "seed": str(args.seed), "timed runs per step": str(repeats),
                "timed runs on big (build, apply, ...)": str(heavy),
                "warm-up runs": f"{warmup} (big: {heavy_warmup})",
                "big workload": scale.big_label, "Ansible": ansible_version,
                "tool measured": installed,
                "Ansible runs": f"{ansible_repeats} per step after a warm-up (one when it "
                                f"hits the cap), stopped at {args.ansible_cap:.0f} s"}
    text = report.render(rows, info, settings, described, cfg.commands, sizes, notes, elapsed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print()
    print("\n".join(report.table(rows)))
    print()
    print("\n".join(report.targets(rows)))
    print(f"\nbench: wrote {out} ({elapsed / 60:.1f} min)")
    return 0


def _loadavg() -> tuple[float, float, float]:
    try:
        parts = Path("/proc/loadavg").read_text().split()
        return float(parts[0]), float(parts[1]), float(parts[2])
    except (OSError, ValueError, IndexError):
        return (0.0, 0.0, 0.0)
