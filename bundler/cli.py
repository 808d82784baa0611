"""``gitops-bundle``: the workstation's command line. The only place that prints and exits.

Errors from both trees (``bundler.errors.BuildError``, ``applier.errors.ApplierError``)
become one line on stderr and their exit code; see README "Exit codes".
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from applier import _log
from applier.cli import UsageError, run_command
from applier.errors import ApplierError, ExitCode
from bundler.build import (
    BuildOptions,
    add_signature,
    build,
    inspect_bundle,
    load_trust_update,
    parse_duration,
    verify_bundle,
)
from bundler.errors import BuildError
from bundler.signing import PASSPHRASE_ENV, load_signing_key, passphrase_for
from bundler.wheelhouse import wheelhouse_cmd
from bundler.writer import regular_or_absent

PROG = "gitops-bundle"



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
@click.version_option(package_name="gitops-airgap", prog_name=PROG)
def cli(verbose: bool) -> None:
    """Build, sign, verify and inspect GitOps bundles for offline hosts."""
    _log.setup(PROG, verbose)


_BRANCH = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)(?!.*/\.)(?!.*\.lock$)[A-Za-z0-9._/-]{1,190}"
                     r"(?<![/.])")


def _branch(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--branch: '' records none; else a branch name git accepts and the manifest's
    ref pattern holds (letters, digits, '.', '_', '-', '/')."""
    del ctx, param
    if value is None or value == "":
        return value
    if not _BRANCH.fullmatch(value) or value.startswith(("/", ".")):
        raise click.BadParameter(f"{value!r} is not a branch name a bundle can record "
                                 "(letters, digits, '.', '_', '-', '/'; as git allows)")
    return value


def _repo_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    del ctx, param
    if value is not None and (not value.strip() or not value.isprintable()
                              or len(value) > 200):
        raise click.BadParameter(f"{value!r} is not a repository name (printable text, "
                                 "1-200 characters)")
    return value


class _OutputFile(click.Path):
    """A bundle file to write: not a directory, nor named like one (``bundles/`` would
    otherwise be written as a file called ``bundles``), and if it exists, a regular
    file: the bundle replaces it by rename, which would replace ``/dev/null`` (run as
    root, "just check it builds") or a FIFO with a file."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.endswith("/"):
            self.fail(f"{value!r} names a directory: give the bundle's file name", param, ctx)
        path = super().convert(value, param, ctx)
        if isinstance(path, Path) and not regular_or_absent(path):
            self.fail(f"{str(value)!r} exists and is not a regular file", param, ctx)
        return path


def _not_the_key(out: Path | None, key_path: Path) -> None:
    """The bundle must not be written over the private key that signs it."""
    try:
        same = out is not None and out.exists() and out.samefile(key_path)
    except OSError:
        same = False
    if same:
        raise click.BadParameter(f"{str(out)!r} is the signing key (--key)",
                                 param_hint="'-o' / '--output'")


@cli.command("build")
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."))
@click.option("--rev", default="HEAD", show_default=True, help="The commit to build.")
@click.option("--path", "subpath", default="", help="Repo subdirectory holding gitops.yaml.")
@click.option("--key", "key_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help=f"OpenSSH Ed25519 private key (passphrase from ${PASSPHRASE_ENV} or a "
                   "prompt).")
@click.option("-o", "--output", "out", required=True, type=_OutputFile(),
              help="Bundle file: .tar, .tar.gz or .tar.zst.")
@click.option("--expires", metavar="DURATION", callback=lambda _c, _p, v: _duration(v),
              help="Hosts refuse it after e.g. 90s, 12h, 30d.")
@click.option("--sequence", type=click.IntRange(1, (1 << 63) - 1),
              help="Override the monotonic sequence number.")
@click.option("--compression", type=click.Choice(["none", "gzip", "zstd"]),
              help="Default: from the output file name.")
@click.option("--host", "hosts", multiple=True, help="Only these hosts (repeatable).")
@click.option("--jobs", type=click.IntRange(1, 1024),
              help="Rendering processes (default: by fleet size).")
@click.option("--trust-update", type=click.Path(dir_okay=False, path_type=Path),
              help="Rotate hosts to this allowed_signers file (co-sign with old and new keys).")
@click.option("--trust-threshold", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Signatures the new trust requires (with --trust-update).")
@click.option("--reset-sequence", is_flag=True,
              help="With --trust-update: let hosts reset their sequence high-water mark.")
@click.option("--branch", metavar="NAME", callback=_branch,
              help="Record this branch (default: the one --rev names, none for a commit id "
                   "or a detached CI checkout), so a rebuild elsewhere gives the same bytes.")
@click.option("--repo-name", metavar="NAME", callback=_repo_name,
              help="Record this repository name (default: the clone's directory name).")
def build_cmd(repo: Path, rev: str, subpath: str, key_path: Path, out: Path,
              expires: int | None, sequence: int | None, compression: str | None,
              hosts: tuple[str, ...], jobs: int | None, trust_update: Path | None,
              trust_threshold: int, reset_sequence: bool, branch: str | None,
              repo_name: str | None) -> None:
    """Turn one commit of REPO into one signed, reproducible bundle."""
    if trust_update is None and (reset_sequence or trust_threshold != 1):
        raise click.UsageError("--trust-threshold and --reset-sequence need --trust-update")
    _not_the_key(out, key_path)
    trust = (load_trust_update(trust_update, trust_threshold, reset_sequence)
             if trust_update is not None else None)
    key = load_signing_key(key_path, passphrase_for(key_path))
    result = build(BuildOptions(
        repo=repo, out=out, rev=rev, subpath=subpath,
        expires=expires, sequence=sequence,
        compression=compression, hosts=hosts or None, jobs=jobs, trust=trust,
        branch=branch, repo_name=repo_name), key)
    m = result.manifest
    files = sum(len(h.files) for h in m.hosts.values())
    click.echo(f"built {result.path} ({result.size} bytes): bundle {m.bundle_id}, commit "
               f"{m.source.commit[:12]} \"{m.source.subject}\", {len(m.hosts)} host(s), "
               f"{files} file(s), {len(m.blobs)} distinct blob(s), signed by "
               f"{key.fingerprint}")


def _duration(value: str | None) -> int | None:
    """``--expires`` in seconds; a malformed duration is a usage error."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except BuildError as e:
        raise click.BadParameter(str(e).removeprefix("--expires: ")) from e


@cli.command("sign")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "key_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Co-signer's private key.")
@click.option("-o", "--output", "out", type=_OutputFile(),
              help="Write here instead of replacing BUNDLE.")
def sign_cmd(bundle: Path, key_path: Path, out: Path | None) -> None:
    """Add a signature to BUNDLE without changing its manifest (k-of-n co-signing)."""
    _not_the_key(out or bundle, key_path)
    key = load_signing_key(key_path, passphrase_for(key_path))
    m = add_signature(bundle, key, out or bundle)
    click.echo(f"signed bundle {m.bundle_id} with {key.fingerprint} -> {out or bundle}")


@cli.command("verify")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--allowed-signers", required=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--threshold", type=click.IntRange(1, 100), default=1, show_default=True)
def verify_cmd(bundle: Path, allowed_signers: Path, threshold: int) -> None:
    """Check BUNDLE's signatures against ALLOWED_SIGNERS and every member's digest."""
    v = verify_bundle(bundle, allowed_signers, threshold)
    who = ", ".join(f"{','.join(s.principals)} ({s.fingerprint})" for s in v.signers)
    click.echo(f"OK: bundle {v.manifest.bundle_id} (commit {v.manifest.source.commit[:12]}) "
               f"signed by {who}")


def _iso(t: int | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


@cli.command("inspect")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(bundle: Path, as_json: bool) -> None:
    """Show what BUNDLE holds: commit, signers, hosts, files and sizes."""
    info = inspect_bundle(bundle)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    src = info["source"]
    click.echo(f"bundle    {info['bundle_id']} (sequence {info['sequence']}, "
               f"{info['compression']})")
    click.echo(f"commit    {src['commit']} on {src['branch'] or '-'}: {src['subject']}")
    click.echo(f"author    {src['author']}")
    click.echo(f"created   {_iso(info['created'])}, expires {_iso(info['expires'])}")
    click.echo(f"signed by {', '.join(info['signers'])}")
    click.echo(f"payload   {info['blobs']} blob(s), {info['payload_size']} bytes")
    for name, host in info["hosts"].items():
        click.echo(f"host {name}: {len(host['files'])} file(s), {host['total_size']} bytes")
        for f in host["files"]:
            click.echo(f"  {f['mode']} {f['owner']}:{f['group']} {f['size']:>9} {f['path']}")


cli.add_command(wheelhouse_cmd)


def _run(argv: list[str]) -> int:
    """The click group; its usage errors become ours (one line, exit 2: run_command)."""
    try:
        # With standalone_mode=False, click returns ctx.exit(N)'s code instead of raising.
        code = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        # Not click's own form (usage, a hint, a blank line, then the error).
        ctx = getattr(e, "ctx", None)
        raise UsageError.pointing_to_help(
            e.format_message(), ctx.command_path if ctx is not None else PROG) from e
    except click.Abort as e:  # click's word for Ctrl-C, SIGTERM (see main) or EOF at a prompt
        raise KeyboardInterrupt from e
    return code if isinstance(code, int) else ExitCode.OK


def _terminated(signum: int, frame: object) -> None:
    del frame
    # Once: a second SIGTERM (or one that lands where Python must ignore an exception,
    # in a finaliser) ends the process the default way.
    signal.signal(signum, signal.SIG_DFL)
    # As Ctrl-C does: every with-block and finally on the way out runs, so a CI job
    # cancelled (or 'timeout') mid-build leaves no temp directory behind.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return run_command(PROG, argv, _run, (BuildError, ApplierError))
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
