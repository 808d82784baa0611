"""Deterministic benchmark workloads: real git repositories generated from a seed.

For: ``fleet`` (many hosts, per-host templates plus shared static files), ``big`` (one
host, many files and a few large ones) and ``examples`` (``examples/fleet`` as-is),
each a git repo with a base commit and a chain of commits that each change exactly
one file of the measured host, all committed with fixed dates so the same seed gives
the same commits. Also what Ansible needs to manage the same files (sources, dests,
modes, the host's variables). Not for: running or timing anything (``steps.py``).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLEET = REPO_ROOT / "examples" / "fleet"
MIB = 1 << 20

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Bench Bot", "GIT_AUTHOR_EMAIL": "bench@example.org",
    "GIT_COMMITTER_NAME": "Bench Bot", "GIT_COMMITTER_EMAIL": "bench@example.org",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}
BASE_DATE = 1_793_534_400  # 2026-11-02T12:00:00Z; change commits follow a minute apart

# Words for filler text: letters only, so template filler never looks like Jinja.
_WORD_TEXT = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu server "
    "client upstream backend timeout retry buffer socket listen worker cache proxy route "
    "metric health status enable disable logging level")
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class Scale:
    """How big the generated workloads are."""

    name: str
    hosts: int
    templates: int
    statics: int
    big_files: int
    big_bytes: int
    big_large: tuple[int, ...]  # sizes of the few large files inside big_bytes

    @property
    def big_label(self) -> str:
        return f"{self.big_files} files, {self.big_bytes / MIB:.0f} MiB"


SCALES = {
    "full": Scale("full", 200, 50, 500, 10_000, 1024 * MIB,
                  (100 * MIB, 85 * MIB, 70 * MIB, 50 * MIB)),
    "quick": Scale("quick", 10, 20, 50, 1_000, 50 * MIB, (10 * MIB, 6 * MIB)),
    "tiny": Scale("tiny", 3, 4, 5, 40, 2 * MIB, (512 << 10,)),
}


@dataclass(frozen=True)
class ManagedFile:
    """One file of the measured host, as Ansible should manage it."""

    src: str  # repo-relative source (a .j2 template or a static file)
    dest: str  # absolute target path on the host
    mode: str
    template: bool


@dataclass
class Workload:
    name: str
    description: str
    repo: Path
    host: str
    base: str  # the commit every first apply uses
    changes: list[str]  # commits after base, each changing one file of ``host``
    changed_src: str  # the repo-relative source those commits change
    files: list[ManagedFile]
    host_vars: dict[str, Any] = field(default_factory=dict)
    # Ansible renders templates itself only when the templates use nothing but plain
    # variables; otherwise it copies the files our renderer produced (see steps.py).
    ansible_templates: bool = True


def git(repo: Path, *args: str, date: int | None = None) -> str:
    env = {**os.environ, **GIT_ENV}
    if date is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"@{date} +0000"
    return subprocess.run(["git", "-C", str(repo), *args], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def _init(repo: Path) -> None:
    git(repo, "init", "-q", "-b", "main")
    # No `git gc --auto`: with 10,000 loose objects a commit starts it detached, and it
    # ran for minutes beside the measured steps. The change chain packs it instead.
    git(repo, "config", "gc.auto", "0")


def _commit(repo: Path, message: str, date: int) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--no-verify", "-m", message, date=date)
    return git(repo, "rev-parse", "HEAD")


def _filler(rnd: random.Random, size: int) -> str:
    """Config-looking text of about ``size`` bytes: lines of words, no Jinja syntax."""
    lines: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 9)))
        line = f"{line} {rnd.randint(0, 99999)};"
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines) + "\n"


def _text_bytes(rnd: random.Random, size: int) -> bytes:
    """``size`` bytes of base64 text: compresses to about 3/4, like logs or configs."""
    raw = rnd.randbytes(size * 3 // 4 + 64)
    return base64.encodebytes(raw)[:size]


def _binary_bytes(rnd: random.Random, f: Any, size: int) -> None:
    """Incompressible bytes (archives, images), written in 4 MiB pieces."""
    left = size
    while left > 0:
        n = min(left, 4 * MIB)
        f.write(rnd.randbytes(n))
        left -= n


def _change_commits(repo: Path, rel: str, count: int, binary: bool, seed: int) -> list[str]:
    """``count`` commits, each rewriting ``rel`` (one file of the host) with new bytes."""
    commits = []
    path = repo / rel
    size = path.stat().st_size
    for i in range(count):
        rnd = random.Random(seed * 1000 + i)
        if binary:
            path.write_bytes(rnd.randbytes(size))
        else:
            path.write_text(path.read_text().split("\n# change", 1)[0].rstrip("\n")
                            + f"\n# change {i + 1} {rnd.randint(0, 1 << 30)}\n")
        commits.append(_commit(repo, f"Change {rel} ({i + 1})", BASE_DATE + 60 * (i + 1)))
    # Packed, as a real repo is, before anything is measured (and not while it is).
    git(repo, "repack", "-a", "-d", "-q")
    return commits


# -- fleet ------------------------------------------------------------------------------

def _fleet_template(rnd: random.Random, n: int) -> str:
    head = (f"# t{n:02d}.conf for {{{{ hostname }}}} at {{{{ site }}}}, managed by gitops\n"
            f"listen {{{{ ip }}}}:{{{{ port + {n} }}}}\n"
            "workers {{ workers }}\n"
            "{% for u in users %}\n"
            f"allow {{{{ u }}}} t{n:02d}\n"
            "{% endfor %}\n"
            "{% for k, v in limits | dictsort %}\n"
            "limit {{ k }} {{ v }}\n"
            "{% endfor %}\n")
    # Sized so each rendered file lands between 1 and 4 KiB.
    return head + _filler(rnd, rnd.randint(850, 3700))


def _fleet_vars(rnd: random.Random, i: int) -> dict[str, Any]:
    return {
        "hostname": f"node-{i:03d}.example.internal",
        "ip": f"10.{i // 250}.{i % 250}.{rnd.randint(2, 250)}",
        "site": rnd.choice(["hq", "dr", "lab", "edge"]),
        "port": 8000 + rnd.randint(0, 900),
        "workers": rnd.choice([2, 4, 8, 16]),
        "users": sorted(rnd.sample(_WORDS, rnd.randint(2, 6))),
        "limits": {"nofile": rnd.choice([4096, 65536]), "nproc": rnd.randint(512, 8192)},
    }


def make_fleet(work: Path, scale: Scale, seed: int, changes: int) -> Workload:
    repo = work / "fleet-repo"
    shutil.rmtree(repo, ignore_errors=True)
    rnd = random.Random(seed)
    (repo / "templates").mkdir(parents=True)
    (repo / "files" / "static").mkdir(parents=True)
    (repo / "vars").mkdir()
    lines = ["version: 1", "vars:", "  admin: ops@example.internal", "hosts:"]
    hosts = [f"node-{i:03d}" for i in range(scale.hosts)]
    host_vars: dict[str, dict[str, Any]] = {}
    for i, h in enumerate(hosts):
        lines.append(f"  {h}: {{}}")
        host_vars[h] = _fleet_vars(rnd, i)
        (repo / "vars" / f"{h}.yaml").write_text(json.dumps(host_vars[h], indent=1) + "\n")
    lines.append("files:")
    files: list[ManagedFile] = []
    for n in range(scale.templates):
        src = f"templates/t{n:02d}.conf.j2"
        (repo / src).write_text(_fleet_template(rnd, n))
        dest = f"/etc/fleet/conf.d/t{n:02d}.conf"
        lines.append(f"  - {{src: {src}, dest: {dest}}}")
        files.append(ManagedFile(src, dest, "0644", template=True))
    for n in range(scale.statics):
        src = f"files/static/s{n:03d}.txt"
        (repo / src).write_text(_filler(rnd, rnd.randint(1024, 16 * 1024)))
        dest = f"/opt/fleet/share/{n % 10}/s{n:03d}.conf"
        lines.append(f"  - {{src: {src}, dest: {dest}, mode: \"0640\"}}")
        files.append(ManagedFile(src, dest, "0640", template=False))
    (repo / "gitops.yaml").write_text("\n".join(lines) + "\n")
    _init(repo)
    base = _commit(repo, "Fleet", BASE_DATE)
    changed = "files/static/s000.txt"
    host = hosts[0]
    return Workload(
        name="fleet",
        description=(f"{scale.hosts} hosts x {scale.templates} templates with per-host vars "
                     f"+ {scale.statics} static files shared by all hosts"),
        repo=repo, host=host, base=base,
        changes=_change_commits(repo, changed, changes, binary=False, seed=seed),
        changed_src=changed, files=files, host_vars=host_vars[host])


# -- big --------------------------------------------------------------------------------

def _big_sizes(rnd: random.Random, scale: Scale) -> list[int]:
    small_count = scale.big_files - len(scale.big_large)
    small_total = scale.big_bytes - sum(scale.big_large)
    # Log-uniform between 1 KiB and 1 MiB, then scaled to the exact total.
    raw = [2 ** rnd.uniform(10, 20) for _ in range(small_count)]
    k = small_total / sum(raw)
    sizes = [max(1, int(r * k)) for r in raw]
    sizes[-1] += small_total - sum(sizes)
    return sizes


def make_big(work: Path, scale: Scale, seed: int, changes: int) -> Workload:
    repo = work / "big-repo"
    shutil.rmtree(repo, ignore_errors=True)
    rnd = random.Random(seed + 1)
    lines = ["version: 1", "hosts:", "  vault: {}", "files:"]
    files: list[ManagedFile] = []
    for i, size in enumerate(scale.big_large):
        src = f"large/image-{i}.bin"
        (repo / "large").mkdir(parents=True, exist_ok=True)
        with (repo / src).open("wb") as f:
            _binary_bytes(rnd, f, size)
        dest = f"/srv/images/image-{i}.bin"
        lines.append(f"  - {{src: {src}, dest: {dest}}}")
        files.append(ManagedFile(src, dest, "0644", template=False))
    for i, size in enumerate(_big_sizes(rnd, scale)):
        src = f"data/d{i // 100:03d}/f{i:05d}.dat"
        path = repo / src
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_text_bytes(rnd, size))
        dest = f"/srv/data/d{i // 100:03d}/f{i:05d}.dat"
        lines.append(f"  - {{src: {src}, dest: {dest}}}")
        files.append(ManagedFile(src, dest, "0644", template=False))
    (repo / "gitops.yaml").write_text("\n".join(lines) + "\n")
    _init(repo)
    base = _commit(repo, "Big", BASE_DATE)
    changed = "data/d000/f00000.dat"
    return Workload(
        name="big", description=f"1 host, {scale.big_label} ({len(scale.big_large)} large "
                                f"files of {', '.join(str(s // MIB) for s in scale.big_large)} "
                                "MiB, the rest 1 KiB-1 MiB)",
        repo=repo, host="vault", base=base,
        changes=_change_commits(repo, changed, changes, binary=True, seed=seed),
        changed_src=changed, files=files, ansible_templates=False)


# -- examples/fleet ---------------------------------------------------------------------

def make_examples(work: Path, seed: int, changes: int) -> Workload:
    repo = work / "examples-repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(EXAMPLE_FLEET, repo)
    _init(repo)
    base = _commit(repo, "Example fleet", BASE_DATE)
    changed = "files/nginx/proxy_params"
    # The files are listed after the first apply (steps.py): the renderer decides them.
    return Workload(
        name="examples", description="examples/fleet as-is (host frodo; reload/health "
                                     "commands run as exit-0 stand-ins)",
        repo=repo, host="frodo", base=base,
        changes=_change_commits(repo, changed, changes, binary=False, seed=seed),
        changed_src=changed, files=[], ansible_templates=False)


def resize_big(scale: Scale, mib: int) -> Scale:
    """The same scale with a big workload of ``mib`` MiB (large files scaled along)."""
    large: list[int] = []
    for size in sorted(scale.big_large):  # keep the large files that fit in half
        if sum(large) + size <= mib * MIB // 2:
            large.append(size)
    return Scale(scale.name, scale.hosts, scale.templates, scale.statics, scale.big_files,
                 mib * MIB, tuple(large))


def big_disk_need(scale: Scale) -> int:
    """Rough bytes the big workload needs at its peak (repo, objects, bundles, roots)."""
    return 7 * scale.big_bytes
