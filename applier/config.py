"""The host's own configuration: ``<root>/etc/gitops-apply/config.yaml``.

Written by ``gitops-apply init`` and edited by the operator, never by a bundle (the
directory is outside every allowed prefix). ``HostConfig`` is valid by construction;
``schemas/config.schema.json`` says the same and a test keeps them equal.
Not for: the trust file itself (``sshsig.py`` parses allowed_signers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from applier import __version__, _fs
from applier.errors import ApplierError, HostConfigError
from applier.manifest import DRIFT_POLICIES, DriftPolicy, check_target_path

DEFAULT_PREFIXES: tuple[str, ...] = ("/etc", "/opt", "/usr/local", "/srv", "/var/lib")
# The tool's own config and state: no bundle may write there, whatever the prefixes say.
PROTECTED: tuple[str, ...] = ("/etc/gitops-apply", "/var/lib/gitops-apply")
_MERGE = "tag:yaml.org,2002:merge"
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# The parse cache (HostConfig.load_cached) is valid for one release's meaning of the keys.
# /2: duplicate keys refused, allowed_signers a file name (a config the previous
# release parsed with the last of two 'threshold:' keys winning is parsed again).
_CACHE_VERSION = f"{__version__}/2"
_KEYS = {"host", "retain", "allowed_signers", "threshold", "allowed_prefixes", "clock_skew",
         "allow_special_modes", "drift", "metrics_file", "trust_sequence"}


@dataclass(frozen=True)
class HostConfig:
    """What one host is called, whom it trusts and what bundles may do to it."""

    host: str
    retain: int = 5
    allowed_signers: str = "allowed_signers"
    threshold: int = 1
    allowed_prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    clock_skew: int = 300
    allow_special_modes: bool = False
    drift: dict[str, DriftPolicy] = field(default_factory=dict)
    metrics_file: str | None = None
    # The sequence of the bundle whose trust update was adopted last (trust.py): an
    # older rotation is never adopted again, so revoked keys stay revoked.
    trust_sequence: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not HOST_NAME.fullmatch(self.host):
            raise HostConfigError(f"config: host {self.host!r} is not a valid host name")
        for name, value, low, high in (("retain", self.retain, 1, 1000),
                                       ("threshold", self.threshold, 1, 100),
                                       ("clock_skew", self.clock_skew, 0, 366 * 86400),
                                       ("trust_sequence", self.trust_sequence, 0, (1 << 63) - 1)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise HostConfigError(f"config: {name} must be an integer in {low}..{high}")
        if (not isinstance(self.allowed_signers, str) or self.allowed_signers in ("", ".", "..")
                or "/" in self.allowed_signers or "\0" in self.allowed_signers):
            # A name in /etc/gitops-apply: a path would be read outside --root, and a key
            # rotation (trust_store.py) removes the file it replaces.
            raise HostConfigError(f"config: allowed_signers must be a file name in "
                                  f"/etc/gitops-apply, not {self.allowed_signers!r}")
        if not isinstance(self.allow_special_modes, bool):
            raise HostConfigError("config: allow_special_modes must be true or false")
        for prefix in self.allowed_prefixes:
            _path(prefix, "allowed_prefixes")
        for path, policy in self.drift.items():
            _path(path, "drift")
            if policy not in DRIFT_POLICIES:
                raise HostConfigError(
                    f"config: drift policy for {path} must be one of {', '.join(DRIFT_POLICIES)}")
        if self.metrics_file is not None and not isinstance(self.metrics_file, str):
            raise HostConfigError("config: metrics_file must be a path")

    @classmethod
    def from_dict(cls, d: Any, source: str = "config.yaml") -> HostConfig:
        if not isinstance(d, dict):
            raise HostConfigError(f"{source}: must be a mapping")
        unknown = d.keys() - _KEYS
        if unknown:
            raise HostConfigError(f"{source}: unknown key {sorted(unknown, key=str)[0]!r}")
        if "host" not in d:
            raise HostConfigError(f"{source}: missing key 'host'")
        prefixes = d.get("allowed_prefixes", list(DEFAULT_PREFIXES))
        drift = d.get("drift", {}) or {}
        if not isinstance(prefixes, list) or not isinstance(drift, dict):
            raise HostConfigError(f"{source}: allowed_prefixes must be a list, drift a mapping")
        try:
            return cls(
                host=d["host"],
                retain=d.get("retain", 5),
                allowed_signers=d.get("allowed_signers", "allowed_signers"),
                threshold=d.get("threshold", 1),
                allowed_prefixes=tuple(prefixes),
                clock_skew=d.get("clock_skew", 300),
                allow_special_modes=d.get("allow_special_modes", False),
                drift=dict(drift),
                metrics_file=d.get("metrics_file"),
                trust_sequence=d.get("trust_sequence", 0),
            )
        except HostConfigError as e:
            raise HostConfigError(f"{source}: {str(e).removeprefix('config: ')}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "host": self.host,
            "retain": self.retain,
            "allowed_signers": self.allowed_signers,
            "threshold": self.threshold,
            "allowed_prefixes": list(self.allowed_prefixes),
            "clock_skew": self.clock_skew,
            "allow_special_modes": self.allow_special_modes,
        }
        if self.drift:
            out["drift"] = dict(self.drift)
        if self.metrics_file is not None:
            out["metrics_file"] = self.metrics_file
        if self.trust_sequence:
            out["trust_sequence"] = self.trust_sequence
        return out

    def to_yaml(self) -> str:
        import yaml  # noqa: PLC0415 - see load()

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, raw: bytes, path: Path) -> HostConfig:
        # Imported here: importing PyYAML compiles its reader's large Unicode regex, a
        # tenth of a no-op apply's CPU time; commands that never read the config
        # (history, --help), or read it from the cache (load_cached), need not pay it.
        import yaml  # noqa: PLC0415

        class _Loader(yaml.SafeLoader):
            """safe_load that refuses a key given twice: PyYAML keeps the last one, so
            a second 'threshold: 1' below 'threshold: 2' would silently lower k-of-n."""

            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                first: dict[str, int] = {}
                for key_node, _ in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                        line = key_node.start_mark.line + 1
                        if key_node.value in first:
                            raise HostConfigError(
                                f"{path}:{line}: duplicate key {key_node.value!r} (first at "
                                f"line {first[key_node.value]})")
                        first[key_node.value] = line
                return super().construct_mapping(node, deep)

        try:
            data = yaml.load(raw.decode("utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
        except UnicodeDecodeError as e:
            raise HostConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise HostConfigError(f"{where}: {problem}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def load_cached(cls, path: Path, cache: Path) -> tuple[HostConfig, str | None]:
        """Load ``path`` through ``cache``; also return the digest to cache it under.

        The cache holds the config already parsed, as JSON, under the SHA-256 of the
        exact ``config.yaml`` bytes it came from and the tool's version: any edit of the
        file, or an upgrade, parses the YAML again. What comes out of the cache passes
        ``from_dict``'s checks like the YAML does, and an unreadable, torn or stale cache
        is only a miss. The digest returned is None on a hit; otherwise the caller may
        ``store_cache`` it (``Host`` does under its lock, so a read-only command never
        writes). Saves importing PyYAML, about 30 ms of every command.
        """
        raw = _read(path)
        digest = hashlib.sha256(raw).hexdigest()
        try:
            cached = json.loads(cache.read_bytes())
            hit = (isinstance(cached, dict) and cached.get("config_sha256") == digest
                   and cached.get("version") == _CACHE_VERSION)
        except (OSError, ValueError):
            hit = False
        if hit:
            try:
                return cls.from_dict(cached["config"], str(path)), None
            except (HostConfigError, KeyError):
                pass  # not ours after all: the YAML decides
        return cls.from_yaml(raw, path), digest

    def store_cache(self, cache: Path, digest: str) -> None:
        """Write the cache ``load_cached`` reads; a failure only costs the next parse."""
        data = json.dumps({"version": _CACHE_VERSION, "config_sha256": digest,
                           "config": self.to_dict()}, sort_keys=True).encode()
        with contextlib.suppress(ApplierError):
            _fs.atomic_write(cache, data, 0o600, fault="config-cache")


def write_config(config: HostConfig, path: Path, cache: Path,
                 fault: str = "atomic-write") -> None:
    """Replace ``config.yaml`` with ``config``, then cache it under the bytes written."""
    data = config.to_yaml().encode("utf-8")
    _fs.atomic_write(path, data, 0o644, fault=fault)
    config.store_cache(cache, hashlib.sha256(data).hexdigest())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise HostConfigError(
            f"{path}: host not initialised (run: gitops-apply init --host NAME "
            "--allowed-signers FILE)") from None
    except OSError as e:
        raise HostConfigError(f"{path}: cannot read: {e.strerror}") from e


def _path(value: Any, where: str) -> str:
    try:
        return check_target_path(value, where)
    except Exception as e:
        raise HostConfigError(f"config: {where}: {value!r} is not an absolute path") from e


def within(path: str, prefix: str) -> bool:
    """True if ``path`` is ``prefix`` or below it (component-wise, not string-wise)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")
