"""``gitops-apply``: the host's command line. The only place that prints and exits.

Each command calls into ``apply.Host`` and renders its result for people, or as JSON
with ``--json``. Every ``ApplierError`` becomes one line on stderr and its exit code
(``errors.ExitCode``); ``--verbose`` adds the traceback and debug logging.

Start-up time is part of every command's cost (a no-op apply is mostly start-up), so
the modules only some commands need (drift, watch, metrics) are imported inside those
commands, not here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from applier import _log
from applier.apply import Host, Report, describe_signer, init_host
from applier.bundle import reporting_progress
from applier.errors import ApplierError, ExitCode
from applier.verify import VerifiedManifest

if TYPE_CHECKING:
    from applier.drift import DriftReport, SavedSet

PROG = "gitops-apply"
logger = logging.getLogger(__name__)
_METRICS_HELP = ("Write a Prometheus node_exporter textfile here afterwards (default: "
                 "the host config's metrics_file).")


def _host(ctx: click.Context) -> Host:
    obj: dict[str, Any] = ctx.obj
    return Host(obj["root"], lock_wait=obj.get("wait", 0.0))


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _iso(t: int | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


@contextlib.contextmanager
def _progress_bar(desc: str) -> Iterator[None]:
    """A tqdm bar on stderr while a bundle's payload is verified; only on a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    try:
        from tqdm import tqdm  # noqa: PLC0415 - optional on hosts; bars are a nicety
    except ImportError:
        yield
        return
    with tqdm(desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar:
        def update(n: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
                bar.refresh()
            bar.update(n)

        with reporting_progress(update):
            yield


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Treat DIR as the host's root filesystem.")
@click.option("--wait", type=float, default=0.0, metavar="SECONDS",
              help="Wait up to SECONDS for another apply to release the lock.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Prometheus textfile that apply, rollback, drift and watch rewrite.")
@click.version_option(package_name="gitops-airgap", prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, root: Path, wait: float, verbose: bool,
        metrics_file: Path | None) -> None:
    """Verify and apply signed GitOps bundles on an offline host."""
    _log.setup(PROG, verbose)
    ctx.obj = {"root": root.absolute(), "wait": wait, "verbose": verbose,
               "metrics_file": metrics_file}


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
    with _progress_bar("verifying"):
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
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help=_METRICS_HELP)
@click.pass_context
def apply(ctx: click.Context, bundle: Path, dry_run: bool, force: bool, as_json: bool,
          metrics_file: Path | None) -> None:
    """Verify BUNDLE and make this host's managed files match it, atomically."""
    with _metrics_after(ctx, None if dry_run else metrics_file), _progress_bar("verifying"):
        report = _host(ctx).apply(bundle, dry_run=dry_run, force=force)
    _print_report(report, as_json)


@cli.command()
@click.option("--to", "to", metavar="BUNDLE_ID", help="A retained bundle (id or prefix).")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def rollback(ctx: click.Context, to: str | None, dry_run: bool, as_json: bool) -> None:
    """Go back to the previous retained bundle (or --to one), through the same checks."""
    with _metrics_after(ctx, None):
        report = _host(ctx).rollback(to, dry_run=dry_run)
    _print_report(report, as_json)


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
    from applier import drift  # noqa: PLC0415 - see the module docstring

    host = _host(ctx)
    s = host.status()
    s["drift"] = drift.status(host.layout)
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
    d = s["drift"]
    if d["last_check"] is None:
        click.echo("drift:    never checked")
    else:
        click.echo(f"drift:    {d['drifted']} file(s) drifted, {d['remaining']} remaining, at "
                   f"{_iso(d['last_check'])}; {d['saved_sets']} saved set(s)")
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
        files = (len(r.get("added", [])) + len(r.get("updated", [])) + len(r.get("removed", []))
                 + len(r.get("drifted", [])) + len(r.get("files", [])))
        if r["event"] == "drift":
            outcome = f"{len(r.get('drifted', []))} drifted, {len(r.get('fixed', []))} fixed"
        else:
            outcome = r.get("result", r.get("action", ""))
        who = ", ".join(r.get("signers", []))
        click.echo(f"{r['time']}  {r['event']:<9} {r.get('bundle_id') or '-':<24} "
                   f"{files:>4} file(s)  {outcome}" + (f"  signed by {who}" if who else ""))


# -- metrics ------------------------------------------------------------------------------


@contextlib.contextmanager
def _metrics_after(ctx: click.Context, explicit: Path | None) -> Iterator[None]:
    """Write the metrics file after the command, whether it succeeded or failed."""
    try:
        yield
    finally:
        _write_metrics(ctx, explicit)


def _metrics_target(host: Host, explicit: Path | None) -> Path | None:
    """Where metrics go: the command line wins over the host config; None: nowhere."""
    if explicit is not None:
        return explicit
    configured = host.config.metrics_file
    if configured is None:
        return None
    # Under --root, a configured absolute path lives under the root like everything else.
    return host.layout.on_disk(configured) if configured.startswith("/") else Path(
        configured)


def _write_metrics(ctx: click.Context, explicit: Path | None) -> None:
    host = _host(ctx)
    try:
        path = _metrics_target(host, explicit or ctx.obj.get("metrics_file"))
        if path is not None:
            # Only now: a command with no metrics file does not even load the module.
            from applier import metrics  # noqa: PLC0415 - see the module docstring

            metrics.write(host, path)
    except ApplierError as e:
        # Monitoring must not turn a good apply into a failed one.
        logger.warning("cannot write metrics: %s", e)


# -- drift --------------------------------------------------------------------------------


def _print_drift(report: DriftReport, show_diff: bool) -> None:
    if report.bundle_id is None:
        click.echo("no bundle applied yet: nothing to compare")
        return
    click.echo(f"bundle {report.bundle_id}: {report.checked} managed file(s) checked"
               + (f", {len(report.ignored)} ignored by policy" if report.ignored else ""))
    for d in report.drifted:
        fixed = " [reverted]" if d.path in report.fixed else ""
        click.echo(f"  {d.kind:<10} {d.path}  ({d.policy}) {d.reason}{fixed}")
        if show_diff and d.diff:
            for line in d.diff.splitlines():
                click.echo(f"      {line}")
    if report.repair is not None:
        for r in report.repair.commands:
            click.echo(f"  ran: {r.run} -> {'ok' if r.ok else r.reason}")
    if report.saved:
        click.echo(f"saved the overwritten versions as {report.saved} "
                   f"(see: {PROG} drift --history)")
    remaining = report.remaining
    if not report.drifted:
        click.echo("no drift")
    elif not remaining:
        click.echo(f"reverted {len(report.fixed)} drifted file(s)")
    else:
        revert = sum(1 for d in remaining if d.fixable)
        hint = f"; run '{PROG} drift --fix' to revert" if revert else ""
        click.echo(f"{len(remaining)} drifted file(s): {revert} to revert, "
                   f"{len(remaining) - revert} report-only or not repairable{hint}")


def _print_saved(sets: list[SavedSet]) -> None:
    if not sets:
        click.echo("no saved drift versions")
    for s in sets:
        by = s.by.get("user", "?") + (f" (sudo from {s.by['sudo_user']})"
                                      if s.by.get("sudo_user") else "")
        click.echo(f"{s.id}  {_iso(s.time)}  bundle {s.bundle_id}  by {by}  "
                   f"{len(s.files)} file(s)")
        for f in s.files:
            what = f.get("kind", "?")
            if what == "file":
                what = f"file {f['mode']} {f['owner']}:{f['group']} {f['size']} bytes"
            elif what == "symlink":
                what = f"symlink -> {f['link']}"
            click.echo(f"    {f['path']}  [{f['drift']}] {what}")


@cli.command("drift")
@click.option("--fix", is_flag=True, help="Revert drifted files whose policy is 'revert'.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-diff", is_flag=True, help="No unified diffs of changed text files.")
@click.option("--history", "show_history", is_flag=True,
              help="List the out-of-band versions saved before each repair.")
@click.option("--restore", "restore_id", metavar="ID",
              help="Write saved set ID out (see --to) for review or a commit.")
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path),
              help="With --restore: the directory to write into (default: "
                   "./gitops-drift-ID); files land at their host paths below it.")
@click.option("--path", "only", metavar="PATH", help="With --restore: only this file.")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help=_METRICS_HELP)
@click.pass_context
def drift_cmd(ctx: click.Context, fix: bool, as_json: bool, no_diff: bool, show_history: bool,
              restore_id: str | None, to: Path | None, only: str | None,
              metrics_file: Path | None) -> None:
    """Compare the managed files with the current bundle; exit 8 if any drifted.

    With --fix, files whose policy is 'revert' are restored through the same
    transaction as an apply (validate, check, on_change of the affected files, health),
    after their out-of-band versions are saved; 'report' files are only reported,
    'ignore' files not even checked. --fix exits 0 when no drift remains.
    """
    from applier import drift  # noqa: PLC0415 - see the module docstring

    host = _host(ctx)
    if sum([fix, show_history, restore_id is not None]) > 1:
        raise click.UsageError("--fix, --history and --restore are exclusive")
    if (to is not None or only is not None) and restore_id is None:
        raise click.UsageError("--to and --path go with --restore")
    if show_history:
        sets = drift.history(host.layout)
        if as_json:
            _emit_json([s.to_dict() for s in sets])
        else:
            _print_saved(sets)
        return
    if restore_id is not None:
        saved, written = drift.restore(host.layout, restore_id, to, only)
        if as_json:
            _emit_json({"id": saved.id, "written": [str(p) for p in written]})
        else:
            for p in written:
                click.echo(f"wrote {p}")
            click.echo(f"restored {len(written)} file(s) of {saved.id}")
        return
    with _metrics_after(ctx, metrics_file):
        report = (drift.fix if fix else drift.check)(host, with_diff=not no_diff)
    if as_json:
        _emit_json(report.to_dict())
    else:
        _print_drift(report, not no_diff)
    if report.remaining:
        ctx.exit(ExitCode.DRIFT)


# -- watch --------------------------------------------------------------------------------


@cli.command()
@click.argument("inboxes", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--interval", type=click.FloatRange(min=0.01), default=5.0, show_default=True,
              metavar="SECONDS", help="How often to look.")
@click.option("--settle", type=click.FloatRange(min=0.0), default=5.0, show_default=True,
              metavar="SECONDS",
              help="How long size and mtime must stay unchanged before a bundle is taken "
                   "(no wait when NAME.done exists).")
@click.option("--once", is_flag=True, help="Take what is there, then exit (for a .path unit).")
@click.option("--json", "as_json", is_flag=True, help="With --once: outcomes as JSON.")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help=_METRICS_HELP)
@click.pass_context
def watch(ctx: click.Context, inboxes: tuple[Path, ...], interval: float, settle: float,
          once: bool, as_json: bool, metrics_file: Path | None) -> None:
    """Apply bundles that appear in INBOX directories (a USB stick, a drop directory).

    Partial copies are never read; the newest acceptable bundle is applied; rejected
    ones move to INBOX/rejected/ with a .reason file (under the state dir when the
    inbox is read-only). SIGTERM stops after the current bundle.
    """
    from applier.watch import Watcher  # noqa: PLC0415 - see the module docstring

    host = _host(ctx)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        del frame
        logger.info("received %s; stopping after the current bundle",
                    signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    watcher = Watcher(host, list(inboxes), settle=settle, stop=stop,
                      on_cycle=lambda _: _write_metrics(ctx, metrics_file))
    try:
        outcomes = watcher.run(interval, once=once)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if once and as_json:
        _emit_json([o.to_dict() for o in outcomes])
    elif once:
        for o in outcomes:
            click.echo(f"{o.result}: {o.path}: {o.reason}")
        if not outcomes:
            click.echo("nothing new in " + ", ".join(map(str, inboxes)))


def run_cli(group: click.Group, prog: str, argv: list[str] | None,
            errors: tuple[type[Exception], ...]) -> int:
    """Run a click group; map our error trees to one stderr line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        # With standalone_mode=False, click returns ctx.exit(N)'s code instead of raising.
        code = group.main(args=args, prog_name=prog, standalone_mode=False)
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
    return code if isinstance(code, int) else ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, PROG, argv, (ApplierError,))


if __name__ == "__main__":
    sys.exit(main())
