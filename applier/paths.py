"""Where things live on a host, and resolving a bundle's target path under ``--root``.

``HostLayout`` names every file the tool keeps (config, trust, state). ``resolve_target``
turns a manifest path such as ``/etc/nginx/nginx.conf`` into the place on disk it may
be written, following symlinks in its *directories* the way the kernel would inside a
chroot at the root, and refusing when the real location is outside the host's allowed
prefixes or inside the tool's own config and state. The final component is never
followed: a managed file is replaced by rename, which replaces a link, not its target.
Not for: reading or writing file contents (``_fs.py``, ``transaction.py``).
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from applier.config import PROTECTED, within
from applier.errors import PathPolicyError

MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True)
class HostLayout:
    """The tool's files under one root (``/`` on a real host, a temp dir in tests)."""

    root: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "etc/gitops-apply"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.yaml"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/gitops-apply"

    @property
    def config_cache(self) -> Path:
        """config.yaml already parsed (``HostConfig.load_cached``); derived, never edited."""
        return self.state_dir / "config.cache.json"

    @property
    def journal(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def current(self) -> Path:
        return self.state_dir / "current.json"

    @property
    def bundles(self) -> Path:
        return self.state_dir / "bundles"

    @property
    def objects(self) -> Path:
        return self.state_dir / "objects"

    @property
    def staging(self) -> Path:
        return self.state_dir / "staging"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.log"

    @property
    def lock(self) -> Path:
        return self.state_dir / "lock"

    @property
    def bad(self) -> Path:
        return self.state_dir / "bad.json"

    @property
    def drift_saves(self) -> Path:
        return self.state_dir / "drift"

    def on_disk(self, path: str) -> Path:
        """The disk location of an already-resolved host path."""
        return self.root / path.lstrip("/")

    @property
    def root_arg(self) -> str:
        """The ``{root}`` placeholder for commands: empty for ``/`` so paths read naturally."""
        text = str(self.root)
        return "" if text == "/" else text.rstrip("/")


def resolve_target(layout: HostLayout, path: str, prefixes: tuple[str, ...],
                   cache: dict[str, str] | None = None) -> str:
    """The host path a manifest target really lands on, after directory symlinks.

    Raises PathPolicyError if the path, or where its directories lead, is outside
    ``prefixes`` or inside the tool's own config/state, or if a directory component
    is something other than a directory. ``cache`` (directory -> resolved directory)
    lets one operation over thousands of files resolve each directory once; keep it
    no longer than that operation, as the disk may change between operations.
    """
    _check_prefix(path, path, prefixes)
    parent, name = posixpath.split(path)
    real_parent = cache.get(parent) if cache is not None else None
    fresh = real_parent is None
    if real_parent is None:
        real_parent = _resolve_dir(layout, parent, path)
    real = posixpath.join(real_parent, name)
    if real != path:
        _check_prefix(real, path, prefixes)
    if fresh:
        _check_not_protected(layout, real_parent, path, cache)
        if cache is not None:
            cache[parent] = real_parent
    return real


def _check_prefix(real: str, declared: str, prefixes: tuple[str, ...]) -> None:
    via = "" if real == declared else f" (through a symlink to {real})"
    for protected in PROTECTED:
        if within(real, protected):
            raise PathPolicyError(f"{declared}: the tool's own config and state are not "
                                  f"writable by bundles{via}")
        if within(protected, real):
            raise PathPolicyError(f"{declared}: holds the tool's own config and state "
                                  f"({protected}); bundles cannot write it{via}")
    if not any(within(real, p) for p in prefixes):
        raise PathPolicyError(f"{declared}: outside this host's allowed prefixes "
                              f"({', '.join(prefixes)}){via}")


# The cache key under which resolve_target keeps the protected directories' identity
# (no directory path is empty).
_PROTECTED_IDS = ""


def _check_not_protected(layout: HostLayout, real_parent: str, declared: str,
                         cache: dict[str, str] | None) -> None:
    """Refuse a directory that *is* the tool's config or state directory, or lies in
    it, under another name: ``/var/lib`` may be a symlink to ``/srv/varlib`` (or a bind
    mount), and ``/srv`` an allowed prefix. Compared by device and inode, so no
    spelling gets around it; each existing directory on the way up is looked at."""
    ids = cache.get(_PROTECTED_IDS) if cache is not None else None
    if ids is None:
        found: list[str] = []
        for protected in PROTECTED:
            try:
                st = os.stat(layout.on_disk(_resolve_dir(layout, protected, protected)))
            except (OSError, PathPolicyError):
                continue
            found.append(f"{st.st_dev}:{st.st_ino}")
        ids = " ".join(found)
        if cache is not None:
            cache[_PROTECTED_IDS] = ids
    if not ids:
        return
    protected_ids = ids.split()
    d = real_parent
    while True:
        try:
            st = os.lstat(layout.on_disk(d))
        except FileNotFoundError:
            pass
        else:
            if f"{st.st_dev}:{st.st_ino}" in protected_ids:
                raise PathPolicyError(f"{declared}: the tool's own config and state are not "
                                      f"writable by bundles ({d} is the same directory)")
        if d == "/":
            return
        d = posixpath.dirname(d)


def _resolve_dir(layout: HostLayout, directory: str, declared: str) -> str:
    """Resolve every component of ``directory`` as a chroot at ``layout.root`` would."""
    parts = [p for p in directory.split("/") if p]
    resolved = "/"
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = posixpath.join(resolved, part)
        try:
            st = os.lstat(layout.on_disk(candidate))
        except FileNotFoundError:
            # Missing directories are created later; nothing below them can be a link.
            return posixpath.join(candidate, *parts) if parts else candidate
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise PathPolicyError(f"{declared}: too many levels of symbolic links")
            target = os.readlink(layout.on_disk(candidate))
            joined = target if target.startswith("/") else posixpath.join(resolved, target)
            # normpath is safe here: ".." at the root stays at the root, as in a chroot.
            parts = [p for p in posixpath.normpath(joined).split("/") if p] + parts
            resolved = "/"
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise PathPolicyError(f"{declared}: {candidate} is not a directory")
        resolved = candidate
    return resolved
