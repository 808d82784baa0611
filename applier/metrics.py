"""The host's state as a Prometheus node_exporter textfile (monitoring without a network).

node_exporter's textfile collector reads ``*.prom`` files from one directory; the file
must never be seen half-written, so it is replaced atomically (``_fs.atomic_write``).
Everything here is read from the state directory (current.json, retained bundles, the
audit log, drift/last-check.json), never from a bundle. Written after apply, rollback,
drift and each watch cycle that did something, to ``--metrics-file`` or the host
config's ``metrics_file``. Not for: logs (``_log.py``) or ``status`` output (cli.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from applier import _fs

if TYPE_CHECKING:
    from applier.apply import Host

logger = logging.getLogger(__name__)

PREFIX = "gitops"


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    samples: tuple[tuple[dict[str, str], float], ...]
    kind: str = "gauge"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(metrics: Iterable[Metric]) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    for m in metrics:
        name = f"{PREFIX}_{m.name}"
        lines.append(f"# HELP {name} {m.help}")
        lines.append(f"# TYPE {name} {m.kind}")
        for labels, value in m.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {_number(value)}" if text
                         else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    import calendar  # noqa: PLC0415 - only when metrics are written, as drift in collect()

    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def collect(host: Host) -> list[Metric]:
    """Every metric, from the state directory only."""
    # Imported here: the CLI imports this module after every apply to find out whether
    # metrics are wanted at all, and most hosts write none.
    from applier import drift  # noqa: PLC0415

    h = {"host": host.config.host}
    current = host.state.current()
    out = [
        Metric("bundle_sequence", "Sequence number of the bundle currently applied "
               "(0: none).", ((h, current.sequence),)),
        Metric("highest_sequence", "Highest bundle sequence ever applied (replay floor).",
               ((h, current.highest_sequence),)),
    ]
    if current.bundle_id is not None:
        out.append(Metric("bundle_info", "The current bundle; the value is always 1.",
                          (({**h, "bundle_id": current.bundle_id,
                             "commit": current.commit or ""}, 1),)))
    records = host.state.audit_records()
    last = next((r for r in reversed(records) if r.get("event") in ("apply", "rollback")),
                None)
    if last is not None:
        when = _epoch(last.get("time"))
        ok = 1.0 if last.get("result") == "ok" else 0.0
        if when is not None:
            out.append(Metric("last_apply_timestamp_seconds",
                              "When the last apply or rollback finished (Unix time).",
                              ((h, when),)))
        out.append(Metric("last_apply_success",
                          "1 if the last apply or rollback succeeded, 0 if it failed.",
                          (({**h, "event": str(last.get("event"))}, ok),)))
    check = drift.last_check(host.layout)
    if check is not None:
        by_policy = {"revert": 0, "report": 0}
        for d in check.get("drifted", []):
            by_policy[d.get("policy", "revert")] = by_policy.get(d.get("policy", "revert"),
                                                                  0) + 1
        out += [
            Metric("drift_files", "Managed files found drifted at the last drift check.",
                   tuple(({**h, "policy": p}, n) for p, n in sorted(by_policy.items()))),
            Metric("drift_remaining_files",
                   "Drifted files still on disk after the last check (and repair).",
                   ((h, check.get("remaining") or 0),)),
            Metric("drift_last_check_timestamp_seconds",
                   "When the last drift check ran (Unix time).",
                   ((h, check.get("time") or 0),)),
        ]
    out += [
        Metric("retained_bundles", "Bundles retained for rollback.",
               ((h, len(host.state.retained())),)),
        Metric("bad_bundles", "Bundles that failed on this host and are not retried.",
               ((h, len(host.state.bad_bundles())),)),
        Metric("transaction_pending", "1 if an interrupted transaction awaits recovery.",
               ((h, 1 if host.layout.journal.exists() else 0),)),
        Metric("metrics_timestamp_seconds", "When this file was written (Unix time).",
               ((h, int(host.clock())),)),
    ]
    return out


def write(host: Host, path: Path) -> None:
    """Replace ``path`` atomically with the current metrics."""
    _fs.atomic_write(path, render(collect(host)).encode(), 0o644, fault="metrics")
    logger.debug("wrote metrics to %s", path)

