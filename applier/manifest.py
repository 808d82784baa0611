"""The signed manifest of a format-1 bundle: typed, frozen, valid by construction.

Constructing any class here checks it, so code holding a ``Manifest`` never re-checks.
``Manifest.from_bytes`` is the only way untrusted JSON becomes objects, and it is only
ever called on bytes whose signature already checked out (see ``verify.py``). It
rejects unknown fields, duplicate keys and any byte sequence that is not exactly the
canonical serialisation, so there is one byte form per manifest: the one that was
signed. Not for: reading tars (``_tar.py``) or checking signatures (``sshsig.py``).
The JSON Schema ``schemas/manifest.schema.json`` says the same; a test keeps them equal.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import itertools
import json
import posixpath
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

from applier.errors import ManifestError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
GIT_BUNDLE_NAME = "git/history.bundle"
BLOB_PREFIX = "blobs/"

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}")
_BUNDLE_ID = re.compile(r"[0-9]{1,19}-[0-9a-f]{12}")
_MODE = re.compile(r"[0-7]{4}")
_REF = re.compile(r"refs/[A-Za-z0-9._/-]{1,200}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# In a non-ASCII path: C1 controls (U+0085 NEL, U+009B CSI, ...), the bidirectional
# overrides and isolates, and the line and paragraph separators, which would reach a
# terminal or a log verbatim in every message naming the path.
_UNICODE_CONTROL = re.compile("[\x80-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")

# Every top-level manifest field but "hosts" (what ``Manifest._head`` writes).
_HEAD_FIELDS = frozenset({"format", "bundle_id", "sequence", "created", "expires", "source",
                          "builder", "git", "trust"})

MAX_FILE_SIZE = 1 << 40
MAX_ID = (1 << 32) - 1  # numeric owner/group ids below this; (uid_t)-1 means "no change"
# A host path in bytes, so that it fits PATH_MAX (4096, with its NUL) under --root too.
MAX_PATH_BYTES = 3072
MAX_COMMAND_TIMEOUT = 86_400
DriftPolicy = Literal["revert", "report", "ignore"]
DRIFT_POLICIES: tuple[DriftPolicy, ...] = ("revert", "report", "ignore")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)


def canonical_json(obj: Any) -> bytes:
    """The one serialisation that is signed and stored: sorted keys, no spaces, UTF-8."""
    return _CANONICAL.encode(obj).encode("utf-8")


# -- small field checkers -----------------------------------------------------------------


def _fail(where: str, what: str) -> ManifestError:
    return ManifestError(f"manifest {where}: {what}")


def _obj(value: Any, where: str, required: Set[str], optional: Set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "must be an object")
    missing = required - value.keys()
    if missing:
        raise _fail(where, f"missing field {sorted(missing)[0]!r}")
    unknown = value.keys() - required - optional
    if unknown:
        raise _fail(where, f"unknown field {sorted(unknown)[0]!r}")
    return value


def _str(value: Any, where: str, pattern: re.Pattern[str] | None = None, limit: int = 4096) -> str:
    if not isinstance(value, str):
        raise _fail(where, "must be a string")
    if len(value) > limit:
        raise _fail(where, f"longer than {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(where, f"invalid value {value[:80]!r}")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    # bool is an int subclass in Python; JSON true must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, "must be an integer")
    if not low <= value <= high:
        raise _fail(where, f"{value} is outside {low}..{high}")
    return value


def check_target_path(path: str, where: str = "path") -> str:
    """An absolute, normalised POSIX path naming a file (not ``/``), safe to join to a root."""
    _str(path, where, limit=4096)
    if not path.startswith("/") or path.startswith("//"):
        raise _fail(where, f"{path!r} is not an absolute path")
    if path == "/" or path.endswith("/"):
        raise _fail(where, f"{path!r} does not name a file")
    if posixpath.normpath(path) != path or "/./" in path or "/../" in path or path.endswith(
        ("/.", "/..")
    ):
        raise _fail(where, f"{path!r} is not normalised")
    if _CONTROL.search(path):
        raise _fail(where, f"{path!r} contains a control character")
    # The common case (short ASCII paths) needs neither Unicode nor per-component checks:
    # a fleet manifest holds 100,000 paths and this runs on every one.
    if not path.isascii() or len(path) > 255:
        if _UNICODE_CONTROL.search(path):
            raise _fail(where, f"{path!r} contains a control or bidirectional character")
        if not unicodedata.is_normalized("NFC", path):
            raise _fail(where, f"{path!r} is not in Unicode NFC form")
        if any(len(part.encode()) > 255 for part in path.split("/")):
            raise _fail(where, f"{path!r} has a component longer than 255 bytes")
        if len(path.encode()) > MAX_PATH_BYTES:
            raise _fail(where, f"{path[:80]!r}... is longer than {MAX_PATH_BYTES} bytes")
    return path


# -- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command the applier runs: split with shlex (never a shell), with limits."""

    run: str
    timeout: int = 60
    retries: int = 0
    delay: int = 0

    def __post_init__(self) -> None:
        _str(self.run, "command run")
        if not self.run.strip() or "\x00" in self.run:
            raise _fail("command", "run must be a non-empty string")
        _int(self.timeout, "command timeout", 1, MAX_COMMAND_TIMEOUT)
        _int(self.retries, "command retries", 0, 100)
        _int(self.delay, "command delay", 0, 3600)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Command:
        d = _obj(d, where, {"run", "timeout", "retries", "delay"}, set())
        # Values are checked once, by __post_init__.
        return cls(run=d["run"], timeout=d["timeout"], retries=d["retries"], delay=d["delay"])

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "timeout": self.timeout, "retries": self.retries,
                "delay": self.delay}


def _commands(value: Any, where: str, field_name: str) -> tuple[Command, ...]:
    if value == []:  # most files have no commands of a kind: keep that path cheap
        return ()
    if not isinstance(value, list):
        raise _fail(f"{where}.{field_name}", "must be a list")
    return tuple(Command.from_dict(c, f"{where}.{field_name}[{i}]")
                 for i, c in enumerate(value))


@dataclass(frozen=True)
class FileEntry:
    """One managed file of one host: where it goes, what it holds, who owns it."""

    path: str
    sha256: str
    size: int
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    validate: tuple[Command, ...] = ()
    check: tuple[Command, ...] = ()
    on_change: tuple[Command, ...] = ()
    health: tuple[Command, ...] = ()
    drift: DriftPolicy = "revert"

    def __post_init__(self) -> None:
        check_target_path(self.path)
        _str(self.sha256, f"{self.path} sha256", _HEX64)
        _int(self.size, f"{self.path} size", 0, MAX_FILE_SIZE)
        _int(self.mode, f"{self.path} mode", 0, 0o7777)
        for what, name in (("owner", self.owner), ("group", self.group)):
            _str(name, f"{self.path} {what}", _ACCOUNT)
            # 4294967295 is (uid_t)-1, which chown(2) takes as "leave unchanged".
            if name[0].isdigit() and int(name) >= MAX_ID:
                raise _fail(f"{self.path} {what}", f"id {name} is outside 0..{MAX_ID - 1}")
        if self.drift not in DRIFT_POLICIES:
            raise _fail(f"{self.path} drift", f"must be one of {', '.join(DRIFT_POLICIES)}")

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        d = _obj(
            d,
            where,
            {"path", "sha256", "size", "mode", "owner", "group", "validate", "check",
             "on_change", "health", "drift"},
            set(),
        )
        mode = _str(d["mode"], f"{where}.mode", _MODE)
        # Everything else is checked once, by __post_init__ (a fleet has 100,000 files).
        return cls(
            path=d["path"], sha256=d["sha256"], size=d["size"], mode=int(mode, 8),
            owner=d["owner"], group=d["group"],
            validate=_commands(d["validate"], where, "validate"),
            check=_commands(d["check"], where, "check"),
            on_change=_commands(d["on_change"], where, "on_change"),
            health=_commands(d["health"], where, "health"),
            drift=d["drift"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
            "mode": f"{self.mode:04o}",
            "owner": self.owner,
            "group": self.group,
            # Most files have no commands: skip the comprehension (110,000 files x 4).
            "validate": [c.to_dict() for c in self.validate] if self.validate else [],
            "check": [c.to_dict() for c in self.check] if self.check else [],
            "on_change": [c.to_dict() for c in self.on_change] if self.on_change else [],
            "health": [c.to_dict() for c in self.health] if self.health else [],
            "drift": self.drift,
        }

    @property
    def special_mode_bits(self) -> int:
        """setuid/setgid/sticky bits, which a host policy may refuse."""
        return self.mode & 0o7000


@dataclass(frozen=True)
class HostEntry:
    """Everything one host takes from the bundle: its files, sorted by path."""

    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        paths = [f.path for f in self.files]
        if paths != sorted(paths):
            raise _fail("host files", "must be sorted by path")
        seen: set[str] = set()
        for p in paths:
            if p in seen:
                raise _fail("host files", f"duplicate path {p!r}")
            seen.add(p)
        # A path cannot be both a file and the directory of another file: in sorted
        # order, the files below "/a/b" start at the insertion point of "/a/b/".
        for p in paths:
            below = p + "/"
            i = bisect.bisect_left(paths, below)
            if i < len(paths) and paths[i].startswith(below):
                raise _fail("host files", f"{p!r} is both a file and a directory")

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}


@dataclass(frozen=True)
class Source:
    """Where the bundle came from: one commit of one repo."""

    repo: str
    commit: str
    tree: str
    branch: str | None
    author: str
    subject: str
    path: str = ""

    def __post_init__(self) -> None:
        _str(self.repo, "source.repo", limit=512)
        _str(self.commit, "source.commit", _HEX40)
        _str(self.tree, "source.tree", _HEX40)
        if self.branch is not None:
            _str(self.branch, "source.branch", limit=512)
        _str(self.author, "source.author", limit=512)
        _str(self.subject, "source.subject", limit=1024)
        _str(self.path, "source.path", limit=1024)

    @classmethod
    def from_dict(cls, d: Any) -> Source:
        d = _obj(d, "source", {"repo", "commit", "tree", "branch", "author", "subject", "path"},
                 set())
        return cls(
            repo=d["repo"], commit=d["commit"], tree=d["tree"], branch=d["branch"],
            author=d["author"], subject=d["subject"], path=d["path"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "commit": self.commit, "tree": self.tree,
                "branch": self.branch, "author": self.author, "subject": self.subject,
                "path": self.path}


@dataclass(frozen=True)
class GitInfo:
    """The ``git/history.bundle`` member: its digest, size and the refs it carries."""

    sha256: str
    size: int
    tips: Mapping[str, str]

    def __post_init__(self) -> None:
        _str(self.sha256, "git.sha256", _HEX64)
        _int(self.size, "git.size", 1, MAX_FILE_SIZE)
        if not self.tips:
            raise _fail("git.tips", "must name at least one ref")
        for ref, commit in self.tips.items():
            _str(ref, "git.tips", _REF)
            _str(commit, f"git.tips[{ref}]", _HEX40)

    @classmethod
    def from_dict(cls, d: Any) -> GitInfo:
        d = _obj(d, "git", {"sha256", "size", "tips"}, set())
        if not isinstance(d["tips"], dict):
            raise _fail("git.tips", "must be an object")
        return cls(sha256=d["sha256"], size=d["size"], tips=dict(d["tips"]))

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "tips": dict(self.tips)}


@dataclass(frozen=True)
class TrustUpdate:
    """A new trust root carried by a bundle (key rotation / revocation, TUF-style).

    The host adopts it only if the manifest is signed by a threshold of the keys it
    trusts now *and* a threshold of the keys in the new set.
    """

    allowed_signers: str
    threshold: int = 1
    reset_sequence: bool = False

    def __post_init__(self) -> None:
        _str(self.allowed_signers, "trust.allowed_signers", limit=1 << 20)
        _int(self.threshold, "trust.threshold", 1, 100)
        if not isinstance(self.reset_sequence, bool):
            raise _fail("trust.reset_sequence", "must be a boolean")

    @classmethod
    def from_dict(cls, d: Any) -> TrustUpdate:
        d = _obj(d, "trust", {"allowed_signers", "threshold", "reset_sequence"}, set())
        return cls(d["allowed_signers"], d["threshold"], d["reset_sequence"])

    def to_dict(self) -> dict[str, Any]:
        return {"allowed_signers": self.allowed_signers, "threshold": self.threshold,
                "reset_sequence": self.reset_sequence}


@dataclass(frozen=True)
class Manifest:
    """The whole signed statement: which commit, which files for which host."""

    bundle_id: str
    sequence: int
    created: int
    source: Source
    builder: str
    hosts: Mapping[str, HostEntry]
    git: GitInfo
    expires: int | None = None
    trust: TrustUpdate | None = None
    format: int = FORMAT_VERSION
    # A host's view (``from_bytes(data, host=...)``): ``hosts`` holds at most that
    # host's part, ``host_names`` every host the bundle is for, and the blob table is
    # taken from a scan of every host's entries. The signed bytes stay the whole truth.
    view_of: str | None = None
    host_names: tuple[str, ...] = ()
    blob_table: InitVar[Mapping[str, int] | None] = None
    _blob_sizes: dict[str, int] = field(default_factory=dict, init=False, repr=False,
                                        compare=False)

    def __post_init__(self, blob_table: Mapping[str, int] | None) -> None:
        if self.format != FORMAT_VERSION:
            raise _fail("format", f"unsupported format version {self.format!r}")
        _str(self.bundle_id, "bundle_id", _BUNDLE_ID)
        _int(self.sequence, "sequence", 1, (1 << 63) - 1)
        _int(self.created, "created", 0, (1 << 40))
        if self.expires is not None:
            _int(self.expires, "expires", 0, (1 << 40))
            if self.expires <= self.created:
                raise _fail("expires", "must be after created")
        _str(self.builder, "builder", limit=256)
        if list(self.hosts) != sorted(self.hosts):
            object.__setattr__(self, "hosts", dict(sorted(self.hosts.items())))
        sizes: dict[str, int] = {}
        if self.view_of is None:
            if blob_table is not None:
                raise _fail("blobs", "a blob table is only given with a host's view")
            object.__setattr__(self, "host_names", tuple(self.hosts))
        else:
            _str(self.view_of, "host", _HOST)
            if self.hosts.keys() - {self.view_of}:
                raise _fail("hosts", f"a view of host {self.view_of!r} holds other hosts")
            if (self.view_of in self.hosts) != (self.view_of in self.host_names):
                raise _fail("hosts", f"host {self.view_of!r} is not in the host list")
            if blob_table is None:
                raise _fail("blobs", "a host's view needs the blob table")
            for digest, size in blob_table.items():
                _str(digest, "blob sha256", _HEX64)
                sizes[digest] = _int(size, f"blob {digest} size", 0, MAX_FILE_SIZE)
        if not self.host_names:
            raise _fail("hosts", "must name at least one host")
        for name in self.host_names:
            _str(name, "hosts", _HOST)
        if list(self.host_names) != sorted(set(self.host_names)):
            raise _fail("hosts", "host names must be sorted and distinct")
        for host in self.hosts.values():
            for f in host.files:
                if sizes.setdefault(f.sha256, f.size) != f.size:
                    raise _fail(f.path, f"blob {f.sha256} has two different sizes")
        object.__setattr__(self, "_blob_sizes", dict(sorted(sizes.items())))

    # -- derived views -------------------------------------------------------------

    @property
    def blobs(self) -> Mapping[str, int]:
        """Every content blob (SHA-256 -> size), sorted, as the tar must carry them."""
        return self._blob_sizes

    def members(self) -> Iterator[tuple[str, str, int]]:
        """(name, sha256, size) of every payload member after the signature, in order."""
        for digest, size in self._blob_sizes.items():
            yield BLOB_PREFIX + digest, digest, size
        yield GIT_BUNDLE_NAME, self.git.sha256, self.git.size

    @property
    def payload_size(self) -> int:
        return sum(self._blob_sizes.values()) + self.git.size

    # -- (de)serialisation -------------------------------------------------------

    def _head(self) -> dict[str, Any]:
        """Every top-level field but ``hosts``."""
        return {
            "format": self.format,
            "bundle_id": self.bundle_id,
            "sequence": self.sequence,
            "created": self.created,
            "expires": self.expires,
            "source": self.source.to_dict(),
            "builder": self.builder,
            "git": self.git.to_dict(),
            "trust": None if self.trust is None else self.trust.to_dict(),
        }

    def _require_whole(self) -> None:
        if self.view_of is not None:
            raise ValueError("a host's view of a manifest is not the manifest: "
                             "use the signed bytes")

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data (``to_bytes`` is its canonical serialisation)."""
        self._require_whole()
        return {**self._head(),
                "hosts": {name: {"files": [f.to_dict() for f in h.files]}
                          for name, h in self.hosts.items()}}

    def view_rest(self) -> dict[str, Any]:
        """A host's view without its own files: what a host keeps beside them (state.py)
        to rebuild the view of bytes it already verified and parsed, with ``from_view``."""
        return {"head": self._head(), "host_names": list(self.host_names),
                "blobs": dict(self._blob_sizes)}

    @classmethod
    def from_view(cls, rest: Any, host: str, entry: HostEntry | None) -> Manifest:
        """Rebuild (and re-check) a host's view from ``view_rest()`` and its own files."""
        rest = _obj(rest, "view", {"head", "host_names", "blobs"}, set())
        if not isinstance(rest["host_names"], list) or not isinstance(rest["blobs"], dict):
            raise _fail("view", "host_names must be a list and blobs an object")
        head = _obj(rest["head"], "view.head", _HEAD_FIELDS, set())
        return cls._from_head(head, {} if entry is None else {host: entry}, {
            "view_of": host, "host_names": tuple(rest["host_names"]),
            "blob_table": rest["blobs"]})

    def to_bytes(self) -> bytes:
        """``canonical_json(self.to_dict())``: the bytes that are signed and stored."""
        return b"".join(self.canonical_chunks())

    def canonical_chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """``to_bytes()`` in pieces of about ``size`` bytes (whole hosts), for a writer
        that hashes and stores them without holding the manifest whole.

        The 26 MB of a 200-host fleet is 110,000 file entries, of which 14,000 are
        distinct objects (the builder's renderer gives every host an entry fits the
        same ``FileEntry``): each distinct entry is serialised once, keyed by identity
        (hashing an entry costs about as much as serialising it), and its bytes reused,
        where one ``json.dumps`` of the whole dict re-sorted and re-encoded every
        occurrence (0.8 s against 0.15 s). Canonical JSON of an object is its members
        in sorted key order joined by commas, of an array its elements joined by
        commas, so the pieces join to the same bytes (tested against the one-call form).
        """
        self._require_whole()
        every = list(itertools.chain.from_iterable(h.files for h in self.hosts.values()))
        distinct = dict(zip(map(id, every), every, strict=True))  # C-level: no loop in Python
        pieces = {i: canonical_json(f.to_dict()) for i, f in distinct.items()}
        top = {**self._head(), "hosts": None}
        out: list[bytes] = []
        held = 0
        for n, (key, value) in enumerate(sorted(top.items())):
            out.append((b"{" if n == 0 else b",") + canonical_json(key) + b":")
            if key != "hosts":
                out.append(canonical_json(value))
                continue
            for m, (name, h) in enumerate(sorted(self.hosts.items())):
                host = ((b"{" if m == 0 else b",") + canonical_json(name) + b':{"files":['
                        + b",".join(map(pieces.__getitem__, map(id, h.files))) + b"]}")
                out.append(host)
                held += len(host)
                if held >= size:
                    yield b"".join(out)
                    out.clear()
                    held = 0
            out.append(b"}" if self.hosts else b"{}")
        out.append(b"}")
        yield b"".join(out)

    @classmethod
    def from_dict(cls, d: Any, host: str | None = None) -> Manifest:
        """The manifest, or with ``host`` that host's view of it (see ``from_bytes``)."""
        d = _obj(d, "", _HEAD_FIELDS | {"hosts"}, set())
        # The format version is checked first so a future format fails with that reason.
        fmt = _int(d["format"], "format", 0, 1 << 31)
        if fmt != FORMAT_VERSION:
            raise _fail("format", f"unsupported format version {fmt}")
        hosts_in = d["hosts"]
        if not isinstance(hosts_in, dict):
            raise _fail("hosts", "must be an object")
        raw_files = {name: _host_files(name, raw) for name, raw in hosts_in.items()}
        if host is None:
            return cls._from_head(d, {name: _host_entry(name, files)
                                      for name, files in raw_files.items()}, {})
        own = {host: _host_entry(host, raw_files[host])} if host in raw_files else {}
        sizes: dict[str, int] = {}
        for name, files in raw_files.items():
            _add_blobs(sizes, name, files)
        return cls._from_head(d, own, {"view_of": host, "host_names": tuple(raw_files),
                                       "blob_table": sizes})

    @classmethod
    def _from_head(cls, d: dict[str, Any], hosts: dict[str, HostEntry],
                   view: dict[str, Any]) -> Manifest:
        fmt = _int(d["format"], "format", 0, 1 << 31)
        if fmt != FORMAT_VERSION:
            raise _fail("format", f"unsupported format version {fmt}")
        expires = d["expires"]
        return cls(
            format=fmt,
            bundle_id=_str(d["bundle_id"], "bundle_id", _BUNDLE_ID),
            sequence=_int(d["sequence"], "sequence", 1, (1 << 63) - 1),
            created=_int(d["created"], "created", 0, 1 << 40),
            expires=None if expires is None else _int(expires, "expires", 0, 1 << 40),
            source=Source.from_dict(d["source"]),
            builder=_str(d["builder"], "builder", limit=256),
            hosts=hosts,
            git=GitInfo.from_dict(d["git"]),
            trust=None if d["trust"] is None else TrustUpdate.from_dict(d["trust"]),
            **view,
        )

    @classmethod
    def from_bytes(cls, data: bytes, host: str | None = None) -> Manifest:
        """Parse signed manifest bytes; anything but the canonical form is rejected.

        With ``host``, build that host's view: its own files are checked and built in
        full, other hosts' entries only give the blob table (digest and size of every
        payload member). A fleet manifest lists every file of every host (110,000
        entries for 200 hosts), and a host needs objects for its own 500; the builder
        and ``gitops-bundle verify`` check every host in full.

        A host's view is read one host at a time (``_host_view``), so the whole
        document never exists as Python objects (about 200 MiB for a 26 MB manifest);
        it accepts only what the whole-document path accepts, and anything it does not
        accept goes to that path, which alone words the errors.
        """
        with _gc_paused():
            if host is not None:
                try:
                    return cls._host_view(data, host)
                except (_NotCanonicalError, ManifestError, ValueError, RecursionError):
                    pass
            return cls._from_document(data, host)

    @classmethod
    def _from_document(cls, data: bytes, host: str | None) -> Manifest:
        """``from_bytes`` through one parse of the whole document (the reference path)."""
        try:
            raw = json.loads(data.decode("utf-8"), parse_float=_reject_float,
                             parse_constant=_reject_float)
        except ManifestError:
            raise
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ManifestError(f"manifest.json is not valid JSON: {e}") from e
        # One byte form per manifest. A duplicate key also fails here (the parser
        # keeps the last one, so the re-serialisation is shorter); find it only on
        # this path, as a Python-level hook on every object costs seconds on a
        # fleet manifest.
        try:
            canonical = canonical_json(raw) == data
        except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") in a string
            canonical = False
        if not canonical:
            _find_duplicate_key(data)
            raise ManifestError("manifest.json is not in canonical form")
        try:
            return cls.from_dict(raw, host)
        finally:
            # Freed while the collector is still off: enabled first, it would scan
            # the millions of parsed objects once more (0.3 s on a fleet manifest).
            del raw

    @classmethod
    def _host_view(cls, data: bytes, host: str) -> Manifest:
        """``host``'s view, parsing and dropping one host's entries at a time.

        Every piece (a top-level value, a host name, one file entry) is parsed by the
        same C scanner as ``json.loads`` and must re-serialise to exactly its own bytes,
        or be byte for byte an entry text already checked; keys must be strictly
        increasing and the separators exactly ``:`` and ``,``. Pieces that are each
        canonical, in that frame, make the document that
        ``canonical_json(json.loads(data)) == data`` accepts. Raises ``_NotCanonicalError``
        (or the parser's or a checker's error) for anything else.

        The hosts object, nearly all of a fleet's manifest, is decoded a host at a time
        (``_ViewReader._walk_hosts``), the rest of the document apart: the whole text
        never exists either (26 MB for a 200-host fleet, and four bytes a character
        if a single emoji sat in a commit subject).
        """
        reader = _ViewReader(data, host)
        d = _obj(reader.read(), "", _HEAD_FIELDS | {"hosts"}, set())
        hosts = {} if reader.own is None else {host: _host_entry(host, reader.own)}
        return cls._from_head(d, hosts, {"view_of": host, "host_names": tuple(reader.names),
                                         "blob_table": reader.sizes})


# How a host's object opens in canonical form: its one member, the file list.
_HOST_OPEN = '{"files":['


@functools.cache
def _entry_pattern() -> re.Pattern[str]:
    """The canonical text of a file entry, in the common shape; digest and size captured.

    Everything it matches is exactly ``canonical_json`` of what it parses to: keys in
    sorted order, once each; strings with no backslash and no control character (which
    the encoder writes as they are); integers with no sign and no leading zero, short
    enough to be exact. It matches less than the canonical form (an escape in a string,
    an entry of another shape): such text takes the parse and re-serialisation, which
    decides. The types and ranges of the values are not checked here: an entry of
    another host gives only its digest and size (``_add_blobs``). Compiled on first
    use (2 ms), not at import: most commands never read a fleet's manifest.
    """
    string = r'"[^"\\\x00-\x1f]*"'
    number = r"(?:0|[1-9][0-9]{0,15})"
    command = rf'\{{"delay":{number},"retries":{number},"run":{string},"timeout":{number}\}}'
    commands = rf"\[(?:{command}(?:,{command})*)?\]"
    return re.compile(
        rf'\{{"check":{commands},"drift":{string},"group":{string},"health":{commands},'
        rf'"mode":{string},"on_change":{commands},"owner":{string},"path":{string},'
        rf'"sha256":"([0-9a-f]{{64}})","size":(0|[1-9][0-9]{{0,15}}),"validate":{commands}\}}')


# One host as read by _ViewReader._read_host: its entry texts, the entries whose text
# is new, every entry (only for the host whose view it is), the new canonical texts.
_Host = tuple[list[str], list[Any], list[Any], set[str]]


class _NotCanonicalError(Exception):
    """A host's view cannot be read piecewise: the whole-document path decides."""


# Where the hosts object of a canonical manifest starts (after its key) and ends (its
# next key follows). A quote inside a JSON string is escaped, so these byte strings
# are found only where the keys are; in a document that is not canonical they may be
# found elsewhere, and the reader then refuses what it reads (see _ViewReader).
_HOSTS_KEY = b',"hosts":'
_AFTER_HOSTS = b',"sequence":'
# How many bytes of the hosts object are decoded for the first host; later hosts get
# about the length of the host before them (see _ViewReader._walk_hosts).
_FIRST_WINDOW = 64 << 10


class _ViewReader:
    """One pass over a canonical manifest for ``Manifest._host_view``.

    The document but the hosts object is decoded as one text (``text``), with ``{}``
    in the hosts object's place; the hosts object is decoded a host at a time. Each
    part must be canonical in its place, so together they are the canonical document:
    a JSON value may stand in for any other in a value's place, and the parts meet at
    ASCII bytes, so they decode as the whole would. If the hosts object is not found
    where a canonical document has it, the whole document is decoded as one text.
    """

    def __init__(self, data: bytes, host: str) -> None:
        self.data = data
        self.host = host
        self._hosts = _hosts_span(data)  # the hosts object's bytes: data[start:end]
        if self._hosts is None:
            self.text = data.decode("utf-8")
            self._hosts_at = -1
        else:
            view = memoryview(data)
            before = str(view[:self._hosts[0]], "utf-8")
            self.text = before + "{}" + str(view[self._hosts[1]:], "utf-8")
            self._hosts_at = len(before)  # where the hosts object's place holder is
        self.head: dict[str, Any] = {}
        self.names: list[str] = []  # every host, in order
        self.own: list[Any] | None = None  # the raw entries of ``host``
        self.sizes: dict[str, int] = {}  # the blob table
        # The text of every file entry already found canonical: most entries of a
        # fleet recur on every host (a shared file), and re-serialising an entry costs
        # more than parsing it.
        self._checked: set[str] = set()
        # The previous host's entry texts, in order, and where each sat: a host's list
        # mostly repeats its neighbour's, so the next entry is first compared with the
        # one that followed the last match there. Text that starts with a checked
        # entry's exact text holds that entry (a JSON object ends at its own closing
        # brace, so what follows cannot change it): no parse is needed to know where it
        # ends, or that it is canonical.
        self._previous: list[str] = []
        self._previous_at: dict[str, int] = {}

    def read(self) -> dict[str, Any]:
        """The top-level members but ``hosts`` (present, as None), parsed and checked."""
        if _walk_object(self.text, 0, self._top_value) != len(self.text):
            raise _NotCanonicalError
        return self.head

    def _top_value(self, key: str, start: int) -> int:
        if key == "hosts":
            self.head[key] = None  # present; its members went through _host_value
            text = self.text
            if self._hosts is None:
                return _walk_object(text, start,
                                    lambda name, i: self._host_value(text, name, i))
            if start != self._hosts_at or not text.startswith("{}", start):
                raise _NotCanonicalError
            self._walk_hosts(*self._hosts)
            return start + 2
        self.head[key], end = _scan_canonical(self.text, start)
        return end

    def _walk_hosts(self, start: int, end: int) -> None:
        """Read the hosts object at ``data[start:end]``, decoding about a host at a time.

        Each host is read from a window of the bytes decoded on its own: ``{`` (for
        the first) or ``,``, the host's name, ``:``, its object, then the separator
        that follows (``,`` or the hosts object's closing ``}``). A window that ends
        too soon (the host's reading fails, or the separator is not in it) is doubled
        and the host read again; only a window that reaches ``end`` makes a failure
        final. Reading a host records nothing until it succeeds, and what a window
        holds is a prefix of the bytes, so a host is read as from the whole text (a
        JSON value ends where its own text says). Names must be strictly increasing
        (``_member_key``, as in ``_walk_object``). A window ends on a byte that
        starts a character, so each decodes as its part of the whole would.
        """
        data, view = self.data, memoryview(self.data)
        if data[start:start + 1] != b"{":
            raise _NotCanonicalError
        if end - start == 2 and data[start + 1:end] == b"}":
            return
        at, opening, previous, window = start, "{", None, _FIRST_WINDOW
        while True:
            stop = min(end, at + window)
            while stop < end and 0x80 <= data[stop] < 0xC0:  # a UTF-8 continuation byte
                stop -= 1
            text = str(view[at:stop], "utf-8")
            try:
                name, i, host = self._read_piece(text, opening, previous)
            except (_NotCanonicalError, ManifestError, ValueError, RecursionError):
                if stop == end:
                    raise
                window *= 2
                continue
            self._add_host(name, host)
            previous = name
            used = i if text.isascii() else len(text[:i].encode("utf-8"))
            if text[i] == "}":
                if at + used + 1 != end:
                    raise _NotCanonicalError
                return
            if text[i] != ",":
                raise _NotCanonicalError
            at, opening = at + used, ","
            # Hosts of a fleet mostly have lists of about the same length.
            window = max(_FIRST_WINDOW, used + used // 4)

    def _read_piece(self, text: str, opening: str, previous: str | None,
                    ) -> tuple[str, int, _Host]:
        """``opening``, a host's name after ``previous``, ``:`` and the host's object,
        from the start of ``text``: the name, where the object ends (a separator must
        follow it in ``text``) and what ``_add_host`` records."""
        if text[:1] != opening:
            raise _NotCanonicalError
        name, i = _member_key(text, 1, previous)
        i, host = self._read_host(text, name, i)
        if i >= len(text):  # the separator is past the window
            raise _NotCanonicalError
        return name, i, host

    def _host_value(self, text: str, name: str, start: int) -> int:
        i, host = self._read_host(text, name, start)
        self._add_host(name, host)
        return i

    def _read_host(self, text: str, name: str, start: int,
                   ) -> tuple[int, _Host]:
        """Read host ``name``'s object from ``text[start:]``; record nothing yet.

        Returns where it ends and what ``_add_host`` records.
        """
        _str(name, "hosts", _HOST)
        if not text.startswith(_HOST_OPEN, start):
            raise _NotCanonicalError
        i, host = self._entries(text, name, start + len(_HOST_OPEN))
        if text[i:i + 1] != "}":
            raise _NotCanonicalError
        return i + 1, host

    def _add_host(self, name: str, host: _Host) -> None:
        spans, first_seen, files, fresh = host
        # A recurring entry text names the same digest and size as its first copy.
        _add_blobs(self.sizes, name, first_seen)
        self._checked.update(fresh)
        self._previous = spans
        self._previous_at = dict(zip(spans, range(len(spans)), strict=True))
        self.names.append(name)
        if name == self.host:
            self.own = files

    def _entries(self, text: str, name: str, i: int) -> tuple[int, _Host]:
        """Read one host's file list from ``text[i:]`` (just after its ``[``).

        Returns where the list ends (after its ``]``) and, for ``_add_host``: the entry
        texts, the entries whose text is new (the blob table's), for ``host`` only
        every entry, and the new texts found canonical (recorded only once the host
        is read: a text in ``_checked`` has given its blob to the table).
        """
        own = name == self.host
        previous, previous_at, checked = self._previous, self._previous_at, self._checked
        entry_shape = _entry_pattern()
        spans: list[str] = []
        first_seen: list[Any] = []
        files: list[Any] = []
        fresh: set[str] = set()
        if text[i:i + 1] == "]":
            return i + 1, (spans, first_seen, files, fresh)
        k = 0  # where the next entry is expected in `previous`
        while True:
            expected = previous[k] if k < len(previous) else None
            if expected is not None and not own and text.startswith(expected, i):
                # Checked, and no new blob; so may be the entries after it, often the
                # rest of the list (a fleet's shared files): compared as one text.
                run, block = _run(text, i, previous, k)
                spans.extend(previous[k:k + run])
                end = i + len(block)
                k += run
            else:
                match = None if own else entry_shape.match(text, i)
                if match is not None:
                    # Canonical by its shape (see _entry_pattern), and only its digest
                    # and size are taken: no parse, no re-serialisation.
                    end = match.end()
                    span = text[i:end]
                    if span not in checked and span not in fresh:
                        fresh.add(span)
                        first_seen.append({"sha256": match[1], "size": int(match[2])})
                else:
                    entry, end = _DECODER.raw_decode(text, i)
                    span = text[i:end]
                    if span not in checked and span not in fresh:
                        if _CANONICAL.encode(entry) != span:
                            raise _NotCanonicalError
                        fresh.add(span)
                        first_seen.append(entry)
                    if own:
                        files.append(entry)
                j = previous_at.get(span)
                k = k + 1 if j is None else j + 1
                spans.append(span)
            separator = text[end:end + 1]
            i = end + 1
            if separator == "]":
                return i, (spans, first_seen, files, fresh)
            if separator != ",":
                raise _NotCanonicalError


def _hosts_span(data: bytes) -> tuple[int, int] | None:
    """Where the hosts object of a canonical manifest is in ``data``, or None."""
    key = data.find(_HOSTS_KEY)
    if key < 0:
        return None
    start = key + len(_HOSTS_KEY)
    # From the end: only the few top-level members after the hosts object are read.
    end = data.rfind(_AFTER_HOSTS, start)
    return None if end < 0 else (start, end)


def _run(text: str, i: int, previous: list[str], k: int) -> tuple[int, str]:
    """How many of ``previous[k:]`` (at least the first, known to match) ``text`` holds
    at ``i`` in a row, and their text.

    Entries joined by commas are list elements in a row; each is a JSON object that
    ends at its own closing brace, so text that starts with the joined entries holds
    exactly those. The run is found by doubling, then halving: a few comparisons in C
    where comparing entry by entry took a Python step for each.
    """
    good, good_text = 1, previous[k]
    most = len(previous) - k
    bad: int | None = None  # the shortest run known not to match
    while True:
        if bad is None:
            if good == most:
                break
            size = min(2 * good, most)
        elif bad - good > 1:
            size = (good + bad) // 2
        else:
            break
        candidate = ",".join(previous[k:k + size])
        if text.startswith(candidate, i):
            good, good_text = size, candidate
        else:
            bad = size
    return good, good_text


def _scan_canonical(text: str, i: int) -> tuple[Any, int]:
    """The JSON value at ``text[i:]`` and where it ends, if it is in canonical form."""
    value, end = _DECODER.raw_decode(text, i)
    if _CANONICAL.encode(value) != text[i:end]:
        raise _NotCanonicalError
    return value, end


def _member_key(text: str, i: int, previous: str | None) -> tuple[str, int]:
    """The canonical key at ``text[i:]``, after ``previous`` in sorted order, and where
    its value starts (after the ``:``)."""
    key, end = _scan_canonical(text, i)
    if (not isinstance(key, str) or (previous is not None and not previous < key)
            or text[end:end + 1] != ":"):
        raise _NotCanonicalError
    return key, end + 1


def _walk_object(text: str, i: int, on_value: Callable[[str, int], int]) -> int:
    """Check that ``text[i:]`` opens a canonical JSON object and walk its members.

    ``on_value(key, start)`` reads the member's value starting at ``start`` and returns
    where it ends. Returns the index just after the closing brace.
    """
    if text[i:i + 1] != "{":
        raise _NotCanonicalError
    i += 1
    if text[i:i + 1] == "}":
        return i + 1
    previous: str | None = None
    while True:
        key, i = _member_key(text, i, previous)
        previous = key
        i = on_value(key, i)
        separator = text[i:i + 1]
        i += 1
        if separator == "}":
            return i
        if separator != ",":
            raise _NotCanonicalError


def _host_files(name: Any, raw: Any) -> list[Any]:
    """One host's raw file list, with its name and shape checked (not its entries)."""
    _str(name, "hosts", _HOST)
    h = _obj(raw, f"hosts.{name}", {"files"}, set())
    if not isinstance(h["files"], list):
        raise _fail(f"hosts.{name}.files", "must be a list")
    return h["files"]


def _host_entry(name: str, files: list[Any]) -> HostEntry:
    return HostEntry(tuple(FileEntry.from_dict(f, f"hosts.{name}.files[{i}]")
                           for i, f in enumerate(files)))


def _add_blobs(sizes: dict[str, int], name: str, files: list[Any]) -> None:
    """Add digest -> size of every blob one host's entries name, without building them."""
    for i, f in enumerate(files):
        try:
            digest, size = f["sha256"], f["size"]
            seen = sizes.setdefault(digest, size)
        except (TypeError, KeyError) as e:
            raise _fail(f"hosts.{name}.files[{i}]", "must be an object with sha256 and "
                                                    "size") from e
        if seen != size or type(seen) is not type(size):
            raise _fail(f"hosts.{name}.files[{i}]",
                        f"blob {str(digest)[:64]} has two different sizes")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Building a fleet manifest allocates millions of objects and no cycles; the cyclic
    collector would walk the growing heap again and again (it tripled the parse time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _find_duplicate_key(data: bytes) -> None:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise _fail("", f"duplicate key {k!r}")
            out[k] = v
        return out

    json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)


def _reject_float(value: str) -> Any:
    raise ManifestError(f"manifest: non-integer number {value[:40]!r}")


# The scanner json.loads uses, configured as from_bytes calls it.
_DECODER = json.JSONDecoder(parse_float=_reject_float, parse_constant=_reject_float)


def make_bundle_id(sequence: int, commit: str) -> str:
    """The readable bundle id: ``<sequence>-<first 12 hex of the commit>``."""
    return f"{sequence}-{commit[:12]}"
