"""``gitops-apply``: the host's command line. The only place that prints and exits.

Each command calls into ``apply.Host`` and renders its result for people, or as JSON
with ``--json``. Every ``ApplierError`` becomes one line on stderr and its exit code
(``errors.ExitCode``); ``--verbose`` adds the traceback and debug logging.

The parser is the standard library's ``argparse``: this runs as root on every host, so
it carries no third-party command-line framework, and start-up time is part of every
command's cost (a no-op apply is mostly start-up). For the same reason the modules
only some commands need (drift, watch, metrics) are imported inside those commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from applier import _log
from applier.apply import Host, Report, describe_signer, init_host
from applier.bundle import reporting_progress
from applier.config import HOST_NAME
from applier.errors import ApplierError, ExitCode, HostConfigError
from applier.verify import VerifiedManifest

if TYPE_CHECKING:
    from applier.drift import DriftReport, SavedSet

PROG = "gitops-apply"
logger = logging.getLogger(__name__)
_METRICS_HELP = ("write a Prometheus node_exporter textfile here afterwards (default: "
                 "the host config's metrics_file)")


def _echo(text: str = "") -> None:
    """One line of program output (stdout), written at once, as a pipe reader expects.
    A file name that is not UTF-8 (kept by Python as surrogates) is backslash-escaped."""
    sys.stdout.write(_log.printable(text) + "\n")
    sys.stdout.flush()


def _error(prog: str, message: str) -> None:
    """The one line on stderr of a command that failed."""
    sys.stderr.write(_log.error_line(prog, message) + "\n")


def _emit_json(data: Any) -> None:
    _echo(json.dumps(data, indent=2, sort_keys=True))


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


# -- command line -----------------------------------------------------------------------


class UsageError(Exception):
    """A command line that cannot run: one line on stderr, exit code 2 (usage)."""

    @classmethod
    def pointing_to_help(cls, message: str, command: str) -> UsageError:
        """``message``, then where to read how ``command`` is used."""
        return cls(f"{message} (see: {command} --help)")


class _Parser(argparse.ArgumentParser):
    """argparse with our error line (no usage dump) and no option abbreviations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError.pointing_to_help(message, self.prog)


class _Version(argparse.Action):
    """--version, reading the installed version only when asked (no import otherwise)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> NoReturn:
        from importlib.metadata import version  # noqa: PLC0415 - only for --version

        _echo(f"{PROG}, version {version('gitops-airgap')}")
        parser.exit()


def _path_kind(directory: bool) -> Callable[[str], Path]:
    """A path argument that, if it exists, must be a directory (or must not be one)."""

    def convert(value: str) -> Path:
        path = Path(value)
        if directory and path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{value}: is not a directory")
        if not directory and path.is_dir():
            raise argparse.ArgumentTypeError(f"{value}: is a directory")
        return path

    convert.__name__ = "directory" if directory else "file"
    return convert


_DIR = _path_kind(directory=True)
_FILE = _path_kind(directory=False)


def _at_least(low: float) -> Callable[[str], float]:
    def convert(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not number >= low:
            raise argparse.ArgumentTypeError(f"{value} is below {low:g}")
        return number

    convert.__name__ = "number"
    return convert


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is not in {low}..{high}")
        return number

    convert.__name__ = "number"
    return convert


def _host_name(value: str) -> str:
    if not HOST_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a host name (letters, digits, '.', '_', '-'; up to 63)")
    return value


def _top_parser() -> _Parser:
    """The options every command takes, then COMMAND and whatever follows it."""
    listing = "\n".join(f"  {name:<9} {text.split(chr(10) * 2, 1)[0]}"
                        for name, (_, text, _) in _COMMANDS.items())
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Verify and apply signed GitOps bundles on an offline host.",
                epilog=f"commands:\n{listing}\n\n'{PROG} COMMAND --help' shows a command's "
                       "options.")
    p.add_argument("--root", type=_DIR, default=Path("/"), metavar="DIR",
                   help="treat DIR as the host's root filesystem (default: /)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for another apply to release the lock")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging and tracebacks")
    p.add_argument("--metrics-file", dest="global_metrics", type=_FILE, metavar="PATH",
                   help="Prometheus textfile that apply, rollback, drift and watch rewrite")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="show the version and exit")
    p.add_argument("command", metavar="COMMAND", nargs="?", choices=tuple(_COMMANDS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    """Global options, then the one command's own parser (the others are never built:
    argparse costs milliseconds per parser, on every host command)."""
    top = _top_parser()
    args = top.parse_args(argv)
    if args.command is None:
        top.error("a COMMAND is required")
    handler, text, options = _COMMANDS[args.command]
    c = _Parser(prog=f"{PROG} {args.command}", description=text,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    options(c)
    c.parse_args(args.rest, namespace=args)
    args.handler = handler
    return args


def _as_json(c: _Parser) -> None:
    c.add_argument("--json", dest="as_json", action="store_true",
                   help="machine-readable output")


def _metrics(c: _Parser) -> None:
    c.add_argument("--metrics-file", type=_FILE, metavar="PATH", help=_METRICS_HELP)


def _init_options(c: _Parser) -> None:
    c.add_argument("--host", dest="host_name", required=True, metavar="NAME", type=_host_name,
                   help="this host's name in the bundles")
    c.add_argument("--allowed-signers", required=True, type=_FILE, metavar="FILE",
                   help="OpenSSH allowed_signers file of the keys this host trusts")
    c.add_argument("--threshold", type=_int_in(1, 100), default=1,
                   help="how many distinct trusted keys must sign a bundle (default: 1)")
    c.add_argument("--retain", type=_int_in(1, 1000), default=5,
                   help="how many applied bundles to keep for rollback (default: 5)")
    c.add_argument("--force", action="store_true", help="overwrite an existing configuration")


def _verify_options(c: _Parser) -> None:
    c.add_argument("bundle", type=_FILE, metavar="BUNDLE")
    _as_json(c)


def _apply_options(c: _Parser) -> None:
    c.add_argument("bundle", type=_FILE, metavar="BUNDLE")
    c.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    c.add_argument("--force", action="store_true",
                   help="retry a bundle that failed here before")
    _as_json(c)
    _metrics(c)


def _rollback_options(c: _Parser) -> None:
    c.add_argument("--to", metavar="BUNDLE_ID", help="a retained bundle (id or prefix)")
    c.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    _as_json(c)


def _no_options(c: _Parser) -> None:
    del c


def _drift_options(c: _Parser) -> None:
    c.add_argument("--fix", action="store_true",
                   help="revert drifted files whose policy is 'revert'")
    _as_json(c)
    c.add_argument("--no-diff", action="store_true",
                   help="no unified diffs of changed text files")
    c.add_argument("--history", dest="show_history", action="store_true",
                   help="list the out-of-band versions saved before each repair")
    c.add_argument("--restore", dest="restore_id", metavar="ID",
                   help="write saved set ID out (see --to) for review or a commit")
    c.add_argument("--to", type=_DIR, metavar="DIR",
                   help="with --restore: the directory to write into (default: "
                        "./gitops-drift-ID); files land at their host paths below it")
    c.add_argument("--path", dest="only", metavar="PATH", help="with --restore: only this file")
    _metrics(c)


def _watch_options(c: _Parser) -> None:
    c.add_argument("inboxes", nargs="+", type=_DIR, metavar="INBOX")
    c.add_argument("--interval", type=_at_least(0.01), default=5.0, metavar="SECONDS",
                   help="how often to look (default: 5)")
    c.add_argument("--settle", type=_at_least(0.0), default=5.0, metavar="SECONDS",
                   help="how long size and mtime must stay unchanged before a bundle is "
                        "taken (no wait when NAME.done exists; default: 5)")
    c.add_argument("--once", action="store_true",
                   help="take what is there, then exit (for a .path unit)")
    c.add_argument("--json", dest="as_json", action="store_true",
                   help="with --once: outcomes as JSON")
    _metrics(c)


def _host(args: argparse.Namespace) -> Host:
    return Host(args.root, lock_wait=args.wait)


# -- commands -----------------------------------------------------------------------------


def init(args: argparse.Namespace) -> None:
    config = init_host(args.root, args.host_name, args.allowed_signers, force=args.force,
                       threshold=args.threshold, retain=args.retain)
    _echo(f"initialised host {config.host} under {args.root} "
          f"(threshold {config.threshold}, retain {config.retain})")


def _describe_manifest(v: VerifiedManifest) -> str:
    m = v.manifest
    signers = ", ".join(describe_signer(s) for s in v.signers)
    return (f"bundle {m.bundle_id} (commit {m.source.commit[:12]} \"{m.source.subject}\", "
            f"sequence {m.sequence}) signed by {signers}")


def verify(args: argparse.Namespace) -> None:
    with _progress_bar("verifying"):
        v = _host(args).verify(args.bundle)
    if args.as_json:
        _emit_json({"bundle_id": v.manifest.bundle_id, "sequence": v.manifest.sequence,
                    "commit": v.manifest.source.commit,
                    "signers": [describe_signer(s) for s in v.signers], "ok": True})
    else:
        _echo(f"OK: {_describe_manifest(v)}")


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        _emit_json(report.to_dict())
        return
    plan = report.plan
    verb = {"apply": "apply", "rollback": "roll back to", "drift-fix": "repair"}.get(
        report.action, report.action)
    head = "would " + verb if report.dry_run else verb
    _echo(f"{head} bundle {report.bundle_id}"
               + (f" signed by {', '.join(report.signers)}" if report.signers else ""))
    for c in plan.changes:
        mark = {"add": "+", "update": "~", "remove": "-"}[c.kind]
        why = f" ({c.reason})" if c.kind == "update" else ""
        _echo(f"  {mark} {c.path}{why}")
    if report.dry_run:
        for kind in ("check", "on_change", "health"):
            for cmd in plan.commands(kind):
                _echo(f"  would run ({kind}): {cmd.run}")
    for r in report.commands:
        _echo(f"  ran: {r.run} -> {'ok' if r.ok else r.reason}")
    saving = [c.path for c in plan.changes if c.save]
    if saving and report.dry_run:
        _echo(f"would first save {len(saving)} file(s) the current bundle did not put "
              f"there: {', '.join(saving)}")
    if report.saved:
        _echo(f"saved {len(saving)} file(s) the current bundle did not put there as "
              f"{report.saved} (see: {PROG} drift --history)")
    summary = (f"{len(plan.by_kind('add'))} added, {len(plan.by_kind('update'))} updated, "
               f"{len(plan.by_kind('remove'))} removed, {len(plan.unchanged)} unchanged")
    if report.noop:
        _echo(f"already applied, nothing changed ({summary})")
    else:
        _echo(("dry run: " if report.dry_run else "done: ") + summary)


def apply(args: argparse.Namespace) -> None:
    with (_metrics_after(args, None if args.dry_run else args.metrics_file),
          _progress_bar("verifying")):
        report = _host(args).apply(args.bundle, dry_run=args.dry_run, force=args.force)
    _print_report(report, args.as_json)


def rollback(args: argparse.Namespace) -> None:
    with _metrics_after(args, None):
        report = _host(args).rollback(args.to, dry_run=args.dry_run)
    _print_report(report, args.as_json)


def recover(args: argparse.Namespace) -> None:
    host = _host(args)
    with host.locked():
        done = host.recover()
    _echo("nothing to recover" if done is None
          else f"transaction {done['txid']} ({done['purpose']}): {done['action']}, "
               f"{len(done['files'])} file(s)")


def status(args: argparse.Namespace) -> None:
    from applier import drift  # noqa: PLC0415 - see the module docstring

    host = _host(args)
    s = host.status()
    s["drift"] = drift.status(host.layout)
    if args.as_json:
        _emit_json(s)
        return
    _echo(f"host:     {s['host']}")
    cur = s["current"]
    if cur is None:
        _echo("current:  none (no bundle applied yet)")
    else:
        _echo(f"current:  {cur['bundle_id']} (sequence {cur['sequence']}, commit "
              f"{cur['commit'][:12]}, applied {_iso(cur['applied_at'])})")
    last = s["last_result"]
    if last is not None:
        _echo(f"last:     {last['event']} {last['bundle_id']} at {last['time']}: "
              f"{last['result']}")
    _echo(f"retained: {len(s['retained'])}")
    for r in reversed(s["retained"]):
        mark = "*" if cur and r["bundle_id"] == cur["bundle_id"] else " "
        _echo(f"  {mark} {r['bundle_id']}  applied {_iso(r['applied_at'])}")
    d = s["drift"]
    if d["last_check"] is None:
        _echo("drift:    never checked")
    else:
        _echo(f"drift:    {d['drifted']} file(s) drifted, {d['remaining']} remaining, at "
              f"{_iso(d['last_check'])}; {d['saved_sets']} saved set(s)")
    if s["transaction_pending"]:
        _echo("warning:  an interrupted transaction is pending (run: gitops-apply recover)")


def history(args: argparse.Namespace) -> None:
    records = _host(args).history()
    if args.as_json:
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
        _echo(f"{r['time']}  {r['event']:<9} {r.get('bundle_id') or '-':<24} "
              f"{files:>4} file(s)  {outcome}" + (f"  signed by {who}" if who else ""))


# -- metrics ------------------------------------------------------------------------------


@contextlib.contextmanager
def _metrics_after(args: argparse.Namespace, explicit: Path | None) -> Iterator[None]:
    """Write the metrics file after the command, whether it succeeded or failed."""
    try:
        yield
    finally:
        _write_metrics(args, explicit)


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


def _write_metrics(args: argparse.Namespace, explicit: Path | None) -> None:
    host = _host(args)
    try:
        _ = host.config
    except HostConfigError:
        return  # the command itself failed on it and said so: one line, not two
    try:
        path = _metrics_target(host, explicit or args.global_metrics)
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
        _echo("no bundle applied yet: nothing to compare")
        return
    _echo(f"bundle {report.bundle_id}: {report.checked} managed file(s) checked"
               + (f", {len(report.ignored)} ignored by policy" if report.ignored else ""))
    for d in report.drifted:
        fixed = " [reverted]" if d.path in report.fixed else ""
        _echo(f"  {d.kind:<10} {d.path}  ({d.policy}) {d.reason}{fixed}")
        if show_diff and d.diff:
            for line in d.diff.splitlines():
                _echo(f"      {line}")
    if report.repair is not None:
        for r in report.repair.commands:
            _echo(f"  ran: {r.run} -> {'ok' if r.ok else r.reason}")
    if report.saved:
        _echo(f"saved the overwritten versions as {report.saved} "
                   f"(see: {PROG} drift --history)")
    remaining = report.remaining
    if not report.drifted:
        _echo("no drift")
    elif not remaining:
        _echo(f"reverted {len(report.fixed)} drifted file(s)")
    else:
        revert = sum(1 for d in remaining if d.fixable)
        hint = f"; run '{PROG} drift --fix' to revert" if revert else ""
        _echo(f"{len(remaining)} drifted file(s): {revert} to revert, "
                   f"{len(remaining) - revert} report-only or not repairable{hint}")


def _print_saved(sets: list[SavedSet]) -> None:
    if not sets:
        _echo("no saved drift versions")
    for s in sets:
        by = s.by.get("user", "?") + (f" (sudo from {s.by['sudo_user']})"
                                      if s.by.get("sudo_user") else "")
        _echo(f"{s.id}  {_iso(s.time)}  bundle {s.bundle_id}  by {by}  "
                   f"{len(s.files)} file(s) before {s.purpose}")
        for f in s.files:
            what = f.get("kind", "?")
            if what == "file":
                what = f"file {f['mode']} {f['owner']}:{f['group']} {f['size']} bytes"
            elif what == "symlink":
                what = f"symlink -> {f['link']}"
            _echo(f"    {f['path']}  [{f['drift']}] {what}")


DRIFT_HELP = """Compare the managed files with the current bundle; exit 8 if any drifted.

With --fix, files whose policy is 'revert' are restored through the same
transaction as an apply (validate, check, on_change of the affected files, health),
after their out-of-band versions are saved; 'report' files are only reported,
'ignore' files not even checked. --fix exits 0 when no drift remains."""


def drift_cmd(args: argparse.Namespace) -> int:
    from applier import drift  # noqa: PLC0415 - see the module docstring

    host = _host(args)
    if sum([args.fix, args.show_history, args.restore_id is not None]) > 1:
        raise UsageError("--fix, --history and --restore are exclusive")
    if (args.to is not None or args.only is not None) and args.restore_id is None:
        raise UsageError("--to and --path go with --restore")
    if args.show_history:
        sets = drift.history(host.layout)
        if args.as_json:
            _emit_json([s.to_dict() for s in sets])
        else:
            _print_saved(sets)
        return ExitCode.OK
    if args.restore_id is not None:
        saved, written = drift.restore(host.layout, args.restore_id, args.to, args.only)
        if args.as_json:
            _emit_json({"id": saved.id, "written": [str(p) for p in written]})
        else:
            for p in written:
                _echo(f"wrote {p}")
            _echo(f"restored {len(written)} file(s) of {saved.id}")
        return ExitCode.OK
    with _metrics_after(args, args.metrics_file):
        report = (drift.fix if args.fix else drift.check)(host, with_diff=not args.no_diff)
    if args.as_json:
        _emit_json(report.to_dict())
    else:
        _print_drift(report, not args.no_diff)
    return ExitCode.DRIFT if report.remaining else ExitCode.OK


# -- watch --------------------------------------------------------------------------------

WATCH_HELP = """Apply bundles that appear in INBOX directories (a USB stick, a drop directory).

Partial copies are never read; the newest acceptable bundle is applied; rejected
ones move to INBOX/rejected/ with a .reason file (under the state dir when the
inbox is read-only). SIGTERM stops after the current bundle."""


def watch(args: argparse.Namespace) -> None:
    from applier.watch import Watcher  # noqa: PLC0415 - see the module docstring

    host = _host(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        del frame
        logger.info("received %s; stopping after the current bundle",
                    signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    watcher = Watcher(host, list(args.inboxes), settle=args.settle, stop=stop,
                      on_cycle=lambda _: _write_metrics(args, args.metrics_file))
    try:
        outcomes = watcher.run(args.interval, once=args.once)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if args.once and args.as_json:
        _emit_json([o.to_dict() for o in outcomes])
    elif args.once:
        for o in outcomes:
            _echo(f"{o.result}: {o.path}: {o.reason}")
        if not outcomes:
            _echo("nothing new in " + ", ".join(map(str, args.inboxes)))


# -- running ------------------------------------------------------------------------------

# name -> (handler, help: first line, blank line, more; its options).
_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int | None], str,
                           Callable[[_Parser], None]]] = {
    "init": (init, ("Set this host up: its name and the keys it trusts (copied, so the "
                    "stick can go)."), _init_options),
    "verify": (verify, ("Check BUNDLE's signatures, every member, and this host's policy; "
                        "change nothing."), _verify_options),
    "apply": (apply, "Verify BUNDLE and make this host's managed files match it, atomically.",
              _apply_options),
    "rollback": (rollback, ("Go back to the previous retained bundle (or --to one), "
                            "through the same checks."), _rollback_options),
    "recover": (recover, "Finish an interrupted apply (every command also does this first).",
                _no_options),
    "status": (status, "The current bundle, retained bundles and the last result.", _as_json),
    "history": (history, "The audit log: every apply, rollback and recovery, oldest first.",
                _as_json),
    "drift": (drift_cmd, DRIFT_HELP, _drift_options),
    "watch": (watch, WATCH_HELP, _watch_options),
}


def run_command(prog: str, argv: list[str] | None, command: Callable[[list[str]], int],
                errors: tuple[type[Exception], ...]) -> int:
    """Run ``command(args)``; map a UsageError and our error trees to one stderr line
    and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        return command(args)
    except UsageError as e:
        _error(prog, str(e))
        return ExitCode.USAGE
    except errors as e:
        if verbose:
            traceback.print_exc()
        _error(prog, str(e))
        return int(getattr(e, "exit_code", ExitCode.INTERNAL))
    except KeyboardInterrupt:
        _error(prog, "interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: still one line, traceback with --verbose
        if verbose:
            traceback.print_exc()
        _error(prog, f"internal error: {type(e).__name__}: {e}")
        return ExitCode.INTERNAL


def _run(argv: list[str]) -> int:
    """Parse, then run the command (a UsageError from either: see run_command)."""
    try:
        args = _parse(argv)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    _log.setup(PROG, args.verbose)
    args.root = args.root.absolute()
    code = args.handler(args)
    return ExitCode.OK if code is None else int(code)


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, argv, _run, (ApplierError,))


if __name__ == "__main__":
    sys.exit(main())
