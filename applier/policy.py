"""Host policy over a verified manifest: pure checks, no I/O, ``now`` passed in.

A genuine bundle can still be wrong for this host: older than what it already runs
(replay or downgrade), expired, meant for other hosts, or writing where this host
does not allow. Each refusal is a ``PolicyError`` subclass with one line naming the
cause. Path prefixes are checked again after symlink resolution in paths.py.
Not for: signature checks (verify.py).
"""

from __future__ import annotations

import time

from applier.config import HostConfig
from applier.errors import (
    BadBundleError,
    ExpiredError,
    HostNotInBundleError,
    PathPolicyError,
    ReplayError,
)
from applier.manifest import HostEntry, Manifest
from applier.state import Current


def effective_now(clock: int, current: Current) -> int:
    """The host's notion of now never falls below the newest creation time it accepted.

    An offline host's clock drifts or resets (dead RTC battery); without this floor,
    a clock set back would make an expired bundle valid again.
    """
    return max(clock, current.newest_created)


def check_expiry(manifest: Manifest, now: int, skew: int) -> None:
    if manifest.expires is not None and now > manifest.expires + skew:
        raise ExpiredError(
            f"bundle {manifest.bundle_id} expired at {_iso(manifest.expires)} "
            f"(host time {_iso(now)}, tolerated skew {skew}s)")


def check_replay(manifest: Manifest, manifest_sha256: str, current: Current) -> bool:
    """Raise on replay/downgrade; True if this is exactly the current bundle (re-apply)."""
    if current.manifest_sha256 == manifest_sha256:
        return True
    if manifest.sequence <= current.highest_sequence:
        raise ReplayError(
            f"bundle {manifest.bundle_id} has sequence {manifest.sequence}, not above "
            f"{current.highest_sequence} already applied (use 'gitops-apply rollback' to go back)")
    return False


def host_entry(manifest: Manifest, config: HostConfig) -> HostEntry:
    entry = manifest.hosts.get(config.host)
    if entry is None:
        names = ", ".join(manifest.host_names[:10])
        raise HostNotInBundleError(
            f"bundle {manifest.bundle_id} has no files for host {config.host!r} "
            f"(it is for: {names})")
    return entry


def check_modes(entry: HostEntry, config: HostConfig) -> None:
    if config.allow_special_modes:
        return
    for f in entry.files:
        if f.special_mode_bits:
            raise PathPolicyError(
                f"{f.path}: mode {f.mode:04o} has setuid/setgid/sticky bits, which this host "
                "does not allow (config: allow_special_modes)")


def check_not_bad(manifest_sha256: str, bad: dict[str, str], force: bool) -> None:
    if not force and manifest_sha256 in bad:
        raise BadBundleError(
            f"bundle failed on this host before ({bad[manifest_sha256]}); "
            "use 'apply --force' to try it again")


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
