"""``gitops-apply``: the host's command line. The only place that prints and exits.

Each command calls into ``apply.Host`` and renders its result for people, or as JSON
with ``--json``. Every ``ApplierError`` becomes one line on stderr and its exit code
(``errors.ExitCode``); ``--verbose`` adds the traceback and debug logging.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

from applier import _log
from applier.apply import Host, Report, describe_signer, init_host
from applier.errors import ApplierError, ExitCode
from applier.verify import VerifiedManifest

PROG = "gitops-apply"


def _host(ctx: click.Context) -> Host:
    obj: dict[str, Any] = ctx.obj
    return Host(obj["root"], lock_wait=obj.get("wait", 0.0))


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _iso(t: int | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Treat DIR as the host's root filesystem.")
@click.option("--wait", type=float, default=0.0, metavar="SECONDS",
              help="Wait up to SECONDS for another apply to release the lock.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
@click.version_option(package_name="gitops-airgap", prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, root: Path, wait: float, verbose: bool) -> None:
    """Verify and apply signed GitOps bundles on an offline host."""
    _log.setup(PROG, verbose)
    ctx.obj = {"root": root.absolute(), "wait": wait, "verbose": verbose}


@cli.command()
@click.option("--host", "host_name", required=True, help="This host's name in the bundles.")
@click.option("--allowed-signers", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="OpenSSH allowed_signers file of the keys this host trusts.")
@click.option("--threshold", type=int, default=1, show_default=True,
              help="How many distinct trusted keys must sign a bundle.")
@click.option("--retain", type=int, default=5, show_default=True,
              help="How many applied bundles to keep for rollback.")
@click.option("--force", is_flag=True, help="Overwrite an existing configuration.")
@click.pass_context
def init(ctx: click.Context, host_name: str, allowed_signers: Path, threshold: int,
         retain: int, force: bool) -> None:
    """Set this host up: its name and the keys it trusts (copied, so the stick can go)."""
    config = init_host(ctx.obj["root"], host_name, allowed_signers, force=force,
                       threshold=threshold, retain=retain)
    click.echo(f"initialised host {config.host} under {ctx.obj['root']} "
               f"(threshold {config.threshold}, retain {config.retain})")


def _describe_manifest(v: VerifiedManifest) -> str:
    m = v.manifest
    signers = ", ".join(describe_signer(s) for s in v.signers)
    return (f"bundle {m.bundle_id} (commit {m.source.commit[:12]} \"{m.source.subject}\", "
            f"sequence {m.sequence}) signed by {signers}")


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def verify(ctx: click.Context, bundle: Path, as_json: bool) -> None:
    """Check BUNDLE's signatures, every member, and this host's policy; change nothing."""
    v = _host(ctx).verify(bundle)
    if as_json:
        _emit_json({"bundle_id": v.manifest.bundle_id, "sequence": v.manifest.sequence,
                    "commit": v.manifest.source.commit,
                    "signers": [describe_signer(s) for s in v.signers], "ok": True})
    else:
        click.echo(f"OK: {_describe_manifest(v)}")


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        _emit_json(report.to_dict())
        return
    plan = report.plan
    verb = {"apply": "apply", "rollback": "roll back to", "drift-fix": "repair"}.get(
        report.action, report.action)
    head = "would " + verb if report.dry_run else verb
    click.echo(f"{head} bundle {report.bundle_id}"
               + (f" signed by {', '.join(report.signers)}" if report.signers else ""))
    for c in plan.changes:
        mark = {"add": "+", "update": "~", "remove": "-"}[c.kind]
        why = f" ({c.reason})" if c.kind == "update" else ""
        click.echo(f"  {mark} {c.path}{why}")
    if report.dry_run:
        for kind in ("check", "on_change", "health"):
            for cmd in plan.commands(kind):
                click.echo(f"  would run ({kind}): {cmd.run}")
    for r in report.commands:
        click.echo(f"  ran: {r.run} -> {'ok' if r.ok else r.reason}")
    summary = (f"{len(plan.by_kind('add'))} added, {len(plan.by_kind('update'))} updated, "
               f"{len(plan.by_kind('remove'))} removed, {len(plan.unchanged)} unchanged")
    if report.noop:
        click.echo(f"already applied, nothing changed ({summary})")
    else:
        click.echo(("dry run: " if report.dry_run else "done: ") + summary)


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--force", is_flag=True, help="Retry a bundle that failed here before.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def apply(ctx: click.Context, bundle: Path, dry_run: bool, force: bool, as_json: bool) -> None:
    """Verify BUNDLE and make this host's managed files match it, atomically."""
    _print_report(_host(ctx).apply(bundle, dry_run=dry_run, force=force), as_json)


@cli.command()
@click.option("--to", "to", metavar="BUNDLE_ID", help="A retained bundle (id or prefix).")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def rollback(ctx: click.Context, to: str | None, dry_run: bool, as_json: bool) -> None:
    """Go back to the previous retained bundle (or --to one), through the same checks."""
    _print_report(_host(ctx).rollback(to, dry_run=dry_run), as_json)


@cli.command()
@click.pass_context
def recover(ctx: click.Context) -> None:
    """Finish an interrupted apply (every command also does this first)."""
    host = _host(ctx)
    with host.locked():
        done = host.recover()
    click.echo("nothing to recover" if done is None
               else f"transaction {done['txid']} ({done['purpose']}): {done['action']}, "
                    f"{len(done['files'])} file(s)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The current bundle, retained bundles and the last result."""
    s = _host(ctx).status()
    if as_json:
        _emit_json(s)
        return
    click.echo(f"host:     {s['host']}")
    cur = s["current"]
    if cur is None:
        click.echo("current:  none (no bundle applied yet)")
    else:
        click.echo(f"current:  {cur['bundle_id']} (sequence {cur['sequence']}, commit "
                   f"{cur['commit'][:12]}, applied {_iso(cur['applied_at'])})")
    last = s["last_result"]
    if last is not None:
        click.echo(f"last:     {last['event']} {last['bundle_id']} at {last['time']}: "
                   f"{last['result']}")
    click.echo(f"retained: {len(s['retained'])}")
    for r in reversed(s["retained"]):
        mark = "*" if cur and r["bundle_id"] == cur["bundle_id"] else " "
        click.echo(f"  {mark} {r['bundle_id']}  applied {_iso(r['applied_at'])}")
    if s["transaction_pending"]:
        click.echo("warning:  an interrupted transaction is pending (run: gitops-apply recover)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def history(ctx: click.Context, as_json: bool) -> None:
    """The audit log: every apply, rollback and recovery, oldest first."""
    records = _host(ctx).history()
    if as_json:
        _emit_json(records)
        return
    for r in records:
        files = len(r.get("added", [])) + len(r.get("updated", [])) + len(r.get("removed", []))
        who = ", ".join(r.get("signers", []))
        click.echo(f"{r['time']}  {r['event']:<9} {r.get('bundle_id') or '-':<24} "
                   f"{files:>4} file(s)  {r.get('result', r.get('action', ''))}"
                   + (f"  signed by {who}" if who else ""))


def run_cli(group: click.Group, prog: str, argv: list[str] | None,
            errors: tuple[type[Exception], ...]) -> int:
    """Run a click group; map our error trees to one stderr line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        group.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return ExitCode.USAGE
    except click.Abort:
        click.echo(_log.error_line(prog, "aborted"), err=True)
        return ExitCode.USAGE
    except errors as e:
        if verbose:
            traceback.print_exc()
        click.echo(_log.error_line(prog, str(e)), err=True)
        return int(getattr(e, "exit_code", ExitCode.INTERNAL))
    except KeyboardInterrupt:
        click.echo(_log.error_line(prog, "interrupted"), err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: still one line, traceback with --verbose
        if verbose:
            traceback.print_exc()
        click.echo(_log.error_line(prog, f"internal error: {type(e).__name__}: {e}"), err=True)
        return ExitCode.INTERNAL
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, PROG, argv, (ApplierError,))


if __name__ == "__main__":
    sys.exit(main())
