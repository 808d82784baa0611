"""The wheelhouse that sets an offline host up from the USB stick alone.

An air-gapped host has no package index, so the stick carries one: ``gitops-bundle
wheelhouse OUTDIR`` writes the tool's own wheel and a wheel of every dependency for
the *host's* Python version and platform (which may differ from the workstation's),
plus ``install-from-usb`` and the systemd units, and a ``SHA256SUMS`` over all of it.
On the host, ``install-from-usb`` runs ``pip install --no-index --find-links OUTDIR``.

pip does the resolving and downloading, run as a subprocess of this interpreter; this
module decides what to ask for. The tool's wheel is built from a copy of the source
tree in a temporary directory, so building never writes into the checkout.
Not for: installing (``scripts/install-from-usb``) or bundles (``build.py``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from bundler.errors import WheelhouseError

logger = logging.getLogger(__name__)

PROJECT = "gitops-airgap"
# What a wheel of the project needs from the source tree (tests, docs, .git are not).
_SOURCE_ITEMS = ("pyproject.toml", "README.md", "LICENSE", "applier", "bundler")
SUMS = "SHA256SUMS"


def project_source() -> Path:
    """The source tree this tool runs from (a checkout or an editable install)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{PROJECT}"' not in pyproject.read_text(
            encoding="utf-8"):
        raise WheelhouseError(
            f"{root}: not a {PROJECT} source tree; run from a checkout or pass --source")
    return root


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    logger.info("running: %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
        raise WheelhouseError(f"pip {args[0]} failed (exit {proc.returncode}): "
                              + " | ".join(tail))


def _copy_source(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for item in _SOURCE_ITEMS:
        src = source / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "*.egg-info"))
        elif src.is_file():
            shutil.copy2(src, dest / item)
    if not (dest / "README.md").exists():
        # pyproject.toml names a readme; a checkout without one still builds.
        (dest / "README.md").write_text(f"# {PROJECT}\n", encoding="utf-8")
    return dest


def build_wheelhouse(out: Path, python_version: str | None = None,
                     platforms: tuple[str, ...] = (), source: Path | None = None,
                     zstd: bool = True) -> list[Path]:
    """Write every wheel the host needs, the installer and units, and SHA256SUMS."""
    source = source or project_source()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gitops-wheelhouse-") as tmp:
        tree = _copy_source(source, Path(tmp) / "src")
        built = Path(tmp) / "built"
        _pip("wheel", "--no-deps", "--wheel-dir", str(built), str(tree))
        wheels = sorted(built.glob("gitops_airgap-*.whl"))
        if len(wheels) != 1:
            raise WheelhouseError(f"building {PROJECT} produced {len(wheels)} wheels")
        own = out / wheels[0].name
        shutil.copy2(wheels[0], own)
    target: list[str] = ["--only-binary=:all:"]
    if python_version:
        target += ["--python-version", python_version]
    for p in platforms:
        target += ["--platform", p]
    requirement = f"{PROJECT}[zstd]" if zstd else PROJECT
    # The project's own wheel comes from OUTDIR (--find-links), its dependencies from
    # the index, all as wheels for the host's Python and platform.
    _pip("download", "--dest", str(out), "--find-links", str(out), *target,
         f"{requirement}=={_version(own)}")
    scripts = source / "scripts"
    installer = scripts / "install-from-usb"
    if installer.is_file():
        shutil.copy2(installer, out / installer.name)
        (out / installer.name).chmod(0o755)
    if (scripts / "systemd").is_dir():
        shutil.rmtree(out / "systemd", ignore_errors=True)
        shutil.copytree(scripts / "systemd", out / "systemd")
    return write_sums(out)


def _version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def write_sums(out: Path) -> list[Path]:
    """``SHA256SUMS`` (``sha256sum -c`` format) over every file in the wheelhouse."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != SUMS)
    lines = []
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        lines.append(f"{digest}  {p.relative_to(out).as_posix()}\n")
    (out / SUMS).write_text("".join(lines), encoding="utf-8")
    return files


@click.command("wheelhouse")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--python-version", metavar="X.Y",
              help="The host's Python (default: this interpreter's), e.g. 3.11.")
@click.option("--platform", "platforms", multiple=True, metavar="TAG",
              help="The host's wheel platform tag, e.g. manylinux2014_x86_64 or "
                   "manylinux2014_aarch64 (repeatable; default: this machine's).")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path),
              help=f"The {PROJECT} source tree (default: the one this tool runs from).")
@click.option("--no-zstd", is_flag=True, help="Leave out zstandard (.tar.zst bundles).")
def wheelhouse_cmd(outdir: Path, python_version: str | None, platforms: tuple[str, ...],
                   source: Path | None, no_zstd: bool) -> None:
    """Write OUTDIR: wheels of gitops-airgap and its dependencies for the host, plus
    install-from-usb and the systemd units. Copy it to the stick next to the bundle;
    on the host run OUTDIR/install-from-usb (pip install --no-index from OUTDIR)."""
    files = build_wheelhouse(outdir, python_version, platforms, source, zstd=not no_zstd)
    wheels = [p for p in files if p.suffix == ".whl"]
    for w in wheels:
        click.echo(f"  {w.name}")
    click.echo(f"wrote {len(wheels)} wheel(s) and {SUMS} to {outdir}")
