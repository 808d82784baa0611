"""The measured steps of one workload, each next to its physical limit or peer.

For: build, verify, first apply, re-apply, one-file change, drift, rollback with
``gitops-bundle``/``gitops-apply``, and beside each the same work done by ``git archive
| gzip``, ``gzip -dc | sha256sum``, ``tar -x`` + ``sync``, ``sha256sum`` of the managed
files, or ``ansible-playbook -c local``. Every host lives under a temp ``--root``.
Not for: generating the workloads (workloads.py) or formatting (report.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import BenchError, Sample, Series, run, sync
from bench.workloads import ManagedFile, Workload

RENDER_ONLY = ("import sys; from pathlib import Path; from bundler.git import GitRepo; "
               "from bundler.render import render_fleet; "
               "render_fleet(GitRepo(Path(sys.argv[1])), sys.argv[2], "
               "jobs=int(sys.argv[3]) if len(sys.argv) > 3 else None)")
ARCHIVE = 'git -C "$1" archive "$2" | gzip -6 > "$3"'
DECOMPRESS_HASH = 'gzip -dc "$1" | sha256sum > /dev/null'
UNTAR_SYNC = 'tar -xzf "$1" -C "$2" && sync'
HASH_FILES = 'cd "$1" && xargs -0 -a "$2" sha256sum > /dev/null'
STANDINS = ("systemctl", "nginx", "curl")
PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [vars.json]
  tasks:
    - name: directories
      ansible.builtin.file: {path: "{{ root }}{{ item }}", state: directory, mode: "0755"}
      loop: "{{ bench_dirs }}"
    - name: templates
      ansible.builtin.template:
        src: "{{ item.src }}"
        dest: "{{ root }}{{ item.dest }}"
        mode: "{{ item.mode }}"
      loop: "{{ bench_templates }}"
    - name: files
      ansible.builtin.copy:
        src: "{{ item.src }}"
        dest: "{{ root }}{{ item.dest }}"
        mode: "{{ item.mode }}"
      loop: "{{ bench_copies }}"
"""


def dev_tools() -> tuple[list[str], list[str]]:
    """``gitops-bundle`` and ``gitops-apply`` of the environment running the benchmark."""

    def tool(name: str, module: str) -> list[str]:
        path = shutil.which(name)
        return [path] if path else [sys.executable, "-m", module]

    return tool("gitops-bundle", "bundler.cli"), tool("gitops-apply", "applier.cli")


@dataclass
class Row:
    """One line of the table: our command beside its limit or peer."""

    workload: str
    step: str
    ours: Series
    peer_name: str = "-"
    peer: Series | None = None
    target: str = ""
    # "within": ours/peer <= bound; "faster": peer/ours >= bound
    target_kind: str = ""
    bound: float = 0.0
    note: str = ""
    # A peer measured for a subset of the work only gives a lower bound for its time.
    peer_lower_bound: bool = False

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.ours.median is None or self.peer.median is None:
            return None
        return self.ours.median / self.peer.median

    @property
    def met(self) -> bool | None:
        r = self.ratio
        if r is None or not self.target_kind:
            return None
        if self.target_kind == "within":
            return r <= self.bound
        speedup = 1 / r
        if speedup >= self.bound:
            return True
        return None if self.peer_lower_bound else False


@dataclass
class Config:
    work: Path
    repeats: int
    warmup: int
    heavy_repeats: int  # for the big workload's expensive steps
    ansible: Path | None  # ansible-playbook, or None to skip Ansible
    ansible_cap: float
    ansible_repeats: int = 1  # timed Ansible runs per step (after one warm-up when > 1)
    ansible_note: str = ""
    key: Path = field(default_factory=Path)
    signers: Path = field(default_factory=Path)
    env: dict[str, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)  # one example of each, for results.md
    # The measured commands and the interpreter they run on (main.install_tool).
    bundle_cmd: list[str] = field(default_factory=lambda: dev_tools()[0])
    apply_cmd: list[str] = field(default_factory=lambda: dev_tools()[1])
    python: str = sys.executable

    def log(self, argv: Sequence[str | os.PathLike[str]]) -> None:
        text = " ".join(str(a) for a in argv)
        # Results name commands, not this machine's paths: the work dir becomes $WORK
        # and the interpreter's bin directory (where the console scripts are) goes.
        text = text.replace(str(Path(self.python).parent) + "/", "")
        text = text.replace(str(Path(sys.executable).parent) + "/", "")
        text = text.replace(str(self.work), "$WORK")
        if self.ansible is not None:
            text = text.replace(str(self.ansible.parent) + "/", "")
        if text not in self.commands:
            self.commands.append(text)


def prepare(cfg: Config) -> None:
    """Signing key, allowed signers, stand-ins for reload/health tools."""
    keys = cfg.work / "keys"
    shutil.rmtree(keys, ignore_errors=True)
    keys.mkdir(parents=True)
    cfg.key = keys / "ops"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f",
                    str(cfg.key)], check=True)
    cfg.signers = keys / "allowed_signers"
    cfg.signers.write_text(f"ops {(keys / 'ops.pub').read_text().strip()}\n")
    fakebin = cfg.work / "fakebin"
    fakebin.mkdir(exist_ok=True)
    for tool in STANDINS:
        p = fakebin / tool
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(0o755)
    cfg.env = {**os.environ, "PATH": f"{fakebin}:{os.environ.get('PATH', '')}"}


class WorkloadBench:
    def __init__(self, cfg: Config, wl: Workload, heavy: bool, heavy_warmup: int = 0) -> None:
        self.cfg = cfg
        self.wl = wl
        self.dir = cfg.work / wl.name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.reps = cfg.heavy_repeats if heavy else cfg.repeats
        self.warmup = heavy_warmup if heavy else cfg.warmup
        self.rows: list[Row] = []
        self.root = self.dir / "root"
        self.sizes: dict[str, int] = {}
        self.managed: list[dict[str, Any]] = []

    # -- helpers --------------------------------------------------------------------

    def _run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> Sample:
        self.cfg.log(argv)
        return run(argv, env=self.cfg.env, **kw)

    def _series(self, argv: Sequence[str | os.PathLike[str]], reps: int | None = None,
                before: Any = None, **kw: Any) -> Series:
        """Warm-up run(s), then ``reps`` timed runs; ``before`` resets state untimed."""
        return self._in_turns([argv], reps, before, **kw)[0]

    def _in_turns(self, argvs: Sequence[Sequence[str | os.PathLike[str]]],
                  reps: int | None = None, before: Any = None, **kw: Any) -> list[Series]:
        """One series per command, taken in turns (a, b, a, b, ...) after a warm-up of
        each, so a slow minute of a shared machine weighs on all, not on one."""
        out = [Series() for _ in argvs]
        for i in range(self.warmup + (self.reps if reps is None else reps)):
            for argv, series in zip(argvs, out, strict=True):
                if before is not None:
                    before()
                sync()
                s = self._run(argv, **kw)
                if i >= self.warmup:
                    series.add(s)
        return out

    def _bash(self, script: str, *args: str | os.PathLike[str]) -> list[str]:
        return ["bash", "-c", script, "bench", *[str(a) for a in args]]

    def _build(self, commit: str, out: Path) -> list[str]:
        return [*self.cfg.bundle_cmd, "build", str(self.wl.repo), "--rev", commit, "--key",
                str(self.cfg.key), "-o", str(out)]

    def _apply(self, root: Path, *args: str | os.PathLike[str]) -> list[str]:
        return [*self.cfg.apply_cmd, "--root", str(root), *[str(a) for a in args]]

    def _init(self, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)
        run(self._apply(root, "init", "--host", self.wl.host, "--allowed-signers",
                        self.cfg.signers, "--retain", str(len(self.wl.changes) + 2)),
            env=self.cfg.env)

    def _row(self, step: str, ours: Series, peer_name: str = "-", peer: Series | None = None,
             target: str = "", kind: str = "", bound: float = 0.0, note: str = "") -> Row:
        row = Row(self.wl.name, step, ours, peer_name, peer, target, kind, bound, note)
        self.rows.append(row)
        print(f"  {self.wl.name:<9} {step:<28} ours {_fmt(ours.median)}  "
              f"{peer_name} {_fmt(peer.median if peer else None)}", flush=True)
        return row

    # -- the steps ------------------------------------------------------------------

    def run_all(self) -> list[Row]:
        wl = self.wl
        bundle = self.dir / "bundle.tar.gz"
        archive = self.dir / "archive.tar.gz"
        run(self._build(wl.base, bundle), env=self.cfg.env)  # warm-up for the builds
        run(self._bash(ARCHIVE, wl.repo, wl.base, archive), env=self.cfg.env)
        self.sizes = {"bundle": bundle.stat().st_size, "archive": archive.stat().st_size}
        render_argv = [self.cfg.python, "-c", RENDER_ONLY, str(wl.repo), wl.base]
        cores = os.cpu_count() or 1
        one: Series | None = None
        if wl.name == "fleet" and cores > 1:
            # The pool against one process: two runs of our own code, in turns.
            render, one = self._in_turns([render_argv, [*render_argv, "1"]])
        else:
            render = self._series(render_argv)

        vroot = self.dir / "verify-root"
        self._init(vroot)
        verify = self._series(self._apply(vroot, "verify", bundle))
        verify_peer = self._series(self._bash(DECOMPRESS_HASH, bundle))
        self._row("verify", verify, "gzip -dc | sha256sum", verify_peer,
                  "<= 1.5x", "within", 1.5)
        shutil.rmtree(vroot)

        first = self._series(self._apply(self.root, "apply", bundle),
                             before=lambda: self._init(self.root))
        self._managed_list(bundle)
        host_tar = self.dir / "host-files.tar.gz"
        subprocess.run(["tar", "-czf", str(host_tar), "-C", str(self.root), "--null", "-T",
                        str(self.dir / "managed.list0")], check=True)
        troot = self.dir / "tar-root"

        def fresh_troot() -> None:
            shutil.rmtree(troot, ignore_errors=True)
            troot.mkdir()

        untar = self._series(self._bash(UNTAR_SYNC, host_tar, troot), before=fresh_troot)
        shutil.rmtree(troot)
        self._row("first apply", first, "tar -xzf + sync", untar, "<= 3x", "within", 3.0)
        ansible = self._ansible_setup()
        a_first = self._ansible_run(ansible, fresh=True) if ansible else None
        if a_first is not None:
            self._row("first apply", first, "ansible-playbook", a_first[0], ">= 20x faster",
                      "faster", 20, a_first[1])

        noop = self._series(self._apply(self.root, "apply", bundle))
        hashes = self._series(self._hash_files())
        self._row("re-apply, nothing changed", noop, "sha256sum of files", hashes,
                  "<= 1.5x", "within", 1.5)
        if ansible and a_first is not None and not a_first[0].timed_out:
            a_noop = self._ansible_run(ansible, fresh=False)
            self._row("re-apply, nothing changed", noop, "ansible-playbook", a_noop[0],
                      ">= 50x faster", "faster", 50, a_noop[1])
        elif ansible:
            # Ansible's own first apply did not finish within the cap. Its re-run still
            # has a root to start from: ours, whose files hold the bytes, modes and owners
            # its tasks ask for, so its run is its no-op (checked below, not assumed).
            self._ansible_converge(ansible)
            a_noop = self._ansible_run(ansible, fresh=False, expect_noop=True)
            self._row("re-apply, nothing changed", noop, "ansible-playbook", a_noop[0],
                      ">= 50x faster", "faster", 50,
                      "Ansible's root: a copy of our applied files (its own first apply "
                      "hit the cap); " + a_noop[1])

        if wl.name == "fleet":
            self._one_host_bundle(untar, hashes)

        changed, builds, archives = Series(), Series(), Series()
        for k, commit in enumerate(wl.changes):
            out = self.dir / f"bundle-{k + 1}.tar.gz"
            sync()
            b = self._run(self._build(commit, out))
            sync()
            a = self._run(self._bash(ARCHIVE, wl.repo, commit, archive))
            sync()
            c = self._run(self._apply(self.root, "apply", out))
            out.unlink()
            if k >= self.warmup:
                builds.add(b)
                archives.add(a)
                changed.add(c)
        build_peer = _plus(archives, render) if wl.name == "fleet" else archives
        self._row("build", builds, "git archive | gzip -6", archives,
                  note=f"bundle {_mib(self.sizes['bundle'])} vs archive "
                       f"{_mib(self.sizes['archive'])}")
        if wl.name == "fleet":
            self._row("build", builds, "git archive | gzip + render", build_peer,
                      "<= 3x", "within", 3.0, note="render = render_fleet() alone, same run")
        self._row("render only (in build)", render)
        if one is not None:
            self._row(f"render on {cores} cores", render, "render in 1 process", one,
                      "< 0.8x (both cores used)", "within", 0.8, note="measured in turns")
        self._row("apply, one file changed", changed)
        if ansible and a_first is not None and not a_first[0].timed_out:
            a_change = self._ansible_run(ansible, fresh=False, change=True)
            self._row("apply, one file changed", changed, "ansible-playbook", a_change[0],
                      note=a_change[1])

        drift = self._series(self._apply(self.root, "drift"))
        self._row("drift check", drift, "sha256sum of files", self._series(self._hash_files()))

        rollback = Series()
        for i in range(len(wl.changes)):
            sync()
            s = self._run(self._apply(self.root, "rollback"))
            if i >= self.warmup:
                rollback.add(s)
        self._row("rollback (one file)", rollback)
        shutil.rmtree(self.root, ignore_errors=True)
        return self.rows

    def _one_host_bundle(self, untar: Series, hashes: Series) -> None:
        """The same host's steps from a bundle built for it alone (``build --host``).

        The peers (``tar -x`` of this host's files, ``sha256sum`` of them) hold one
        host's data; a fleet bundle holds 200 hosts' and a 26 MB manifest. These rows
        show what the tool costs on the same data as its peers; informational, the
        targets are judged on the fleet bundle above.
        """
        one = self.dir / "one-host.tar.gz"
        build = self._series([*self._build(self.wl.base, one), "--host", self.wl.host])
        size = one.stat().st_size
        self._row("build (one-host bundle)", build,
                  note=f"build --host {self.wl.host}: bundle {_mib(size)}")
        vroot, oroot = self.dir / "one-verify-root", self.dir / "one-root"
        self._init(vroot)
        verify = self._series(self._apply(vroot, "verify", one))
        self._row("verify (one-host bundle)", verify, "gzip -dc | sha256sum",
                  self._series(self._bash(DECOMPRESS_HASH, one)))
        shutil.rmtree(vroot)
        first = self._series(self._apply(oroot, "apply", one),
                             before=lambda: self._init(oroot))
        self._row("first apply (one-host bundle)", first, "tar -xzf + sync", untar)
        noop = self._series(self._apply(oroot, "apply", one))
        self._row("re-apply, nothing changed (one-host bundle)", noop, "sha256sum of files",
                  hashes)
        shutil.rmtree(oroot)
        one.unlink()

    def _managed_list(self, bundle: Path) -> None:
        out = subprocess.run([*self.cfg.bundle_cmd, "inspect", "--json", str(bundle)], check=True,
                             capture_output=True, env=self.cfg.env).stdout
        self.managed = json.loads(out)["hosts"][self.wl.host]["files"]
        rel = [f["path"].lstrip("/") for f in self.managed]
        (self.dir / "managed.list0").write_bytes(b"".join(p.encode() + b"\0" for p in rel))

    def _hash_files(self) -> list[str]:
        return self._bash(HASH_FILES, self.root, self.dir / "managed.list0")

    # -- Ansible ----------------------------------------------------------------------

    def _ansible_setup(self) -> Path | None:
        """A playbook managing the same files: templates with the host's vars, or copies."""
        if self.cfg.ansible is None:
            return None
        d = self.dir / "ansible"
        src = d / "src"
        src.mkdir(parents=True)
        templates: list[dict[str, str]] = []
        copies: list[dict[str, str]] = []
        if self.wl.ansible_templates:
            tar = subprocess.run(["git", "-C", str(self.wl.repo), "archive", self.wl.base],
                                 check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
            files: list[ManagedFile] = self.wl.files
        else:
            # Same bytes as our renderer made: copy tasks from the first apply's files.
            files = []
            for f in self.managed:
                rel = f["path"].lstrip("/")
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.root / rel, src / rel)
                files.append(ManagedFile(rel, f["path"], f["mode"], template=False))
        for mf in files:
            item = {"src": str(src / mf.src), "dest": mf.dest, "mode": mf.mode}
            (templates if mf.template else copies).append(item)
        dirs = sorted({str(Path(mf.dest).parent) for mf in files})
        data = {**self.wl.host_vars, "root": str(d / "root"), "bench_dirs": dirs,
                "bench_templates": templates, "bench_copies": copies}
        (d / "vars.json").write_text(json.dumps(data, indent=1))
        (d / "play.yml").write_text(PLAYBOOK)
        return d

    def _ansible_converge(self, d: Path) -> None:
        """Ansible's root made a copy of our applied host files (contents, modes)."""
        aroot = d / "root"
        shutil.rmtree(aroot, ignore_errors=True)
        for f in self.managed:
            rel = f["path"].lstrip("/")
            (aroot / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            shutil.copy2(self.root / rel, aroot / rel)

    def _ansible_run(self, d: Path, fresh: bool, change: bool = False,
                     expect_noop: bool = False) -> tuple[Series, str]:
        """Ansible's runs of one step: ``fresh`` empties its root before each run,
        ``change`` makes a new one-file change before each; a run that hits the cap is
        the only one (its time is a lower bound). ``expect_noop`` reports whether the
        runs rewrote any managed file (inode or mtime changed)."""
        assert self.cfg.ansible is not None
        python = self.cfg.ansible.parent / "python"
        env = {**self.cfg.env, "ANSIBLE_LOCALHOST_WARNING": "False",
               "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_RETRY_FILES_ENABLED": "False", "ANSIBLE_PIPELINING": "True",
               "ANSIBLE_HOME": str(self.cfg.work / "ansible-home"),
               "ANSIBLE_PYTHON_INTERPRETER": str(python)}
        argv = [str(self.cfg.ansible), "-i", "localhost,", "-c", "local", "play.yml"]
        self.cfg.log(argv)
        repeats = self.cfg.ansible_repeats
        warmup = 1 if repeats > 1 else 0
        series = Series()
        n = len(self.managed) or len(self.wl.files)
        before = self._stamps(d / "root") if expect_noop else {}
        for i in range(warmup + repeats):
            if fresh:
                shutil.rmtree(d / "root", ignore_errors=True)
            if change:
                self._ansible_change(d)
            sync()
            s = run(argv, env=env, cwd=d, timeout=self.cfg.ansible_cap)
            if s.timed_out:
                note = (f"stopped at the {self.cfg.ansible_cap:.0f} s cap before finishing "
                        f"{n} files: Ansible's time is a lower bound")
                if expect_noop:
                    note += "; " + self._rewritten(before, d / "root")
                return Series([s]), note
            if i >= warmup:
                series.add(s)
        note = f"{series.runs} run{'s' if series.runs > 1 else ''} ({n} files)"
        if expect_noop:
            note += "; " + self._rewritten(before, d / "root")
        if fresh:
            same = self._same_bytes(d / "root")
            note += f"; Ansible's files identical to ours: {same}"
        return series, note

    def _stamps(self, aroot: Path) -> dict[str, tuple[int, int] | None]:
        return {f["path"]: _stamp(aroot / f["path"].lstrip("/")) for f in self.managed}

    def _rewritten(self, before: dict[str, tuple[int, int] | None], aroot: Path) -> str:
        """Whether an Ansible run replaced or rewrote any file it found in place."""
        after = self._stamps(aroot)
        changed = sum(1 for path, stamp in before.items() if after[path] != stamp)
        return ("Ansible rewrote none of them" if changed == 0
                else f"Ansible rewrote {changed} of them (not a pure no-op)")

    def _same_bytes(self, aroot: Path) -> str:
        differ = 0
        for f in self.managed:
            rel = f["path"].lstrip("/")
            try:
                if (aroot / rel).read_bytes() != (self.root / rel).read_bytes():
                    differ += 1
            except OSError:
                differ += 1
        return "yes" if differ == 0 else f"no ({differ} differ in whitespace/vars)"

    def _ansible_change(self, d: Path) -> None:
        """The same one-file change our change commits make."""
        if self.wl.ansible_templates:
            path = d / "src" / self.wl.changed_src
        else:
            dest = self._changed_dest()
            path = d / "src" / dest.lstrip("/")
        with path.open("a") as f:
            f.write("# ansible change\n")

    def _changed_dest(self) -> str:
        for f in self.managed:
            if f["path"].endswith(Path(self.wl.changed_src).name):
                return str(f["path"])
        raise BenchError(f"{self.wl.changed_src}: no managed file of {self.wl.host} for it")


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime): a file replaced or rewritten changes one of them."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _plus(a: Series, b: Series) -> Series:
    """A synthetic series: a's samples each plus b's median (archive + render)."""
    extra = b.median or 0.0
    return Series([Sample(s.wall + extra, s.maxrss_kib) for s in a.samples])


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"
