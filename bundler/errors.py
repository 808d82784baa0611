"""One error tree for the workstation side (``gitops-bundle``).

Every class names its cause and carries the exit code the CLI maps it to; the codes
are the ones ``applier.errors.ExitCode`` documents, shared by both commands. Errors
about the bundle format itself come from ``applier.errors`` (the builder verifies what
it writes with the applier's code). Nothing here prints.
"""

from __future__ import annotations

from applier.errors import ExitCode


class BuildError(Exception):
    """Base of every error the bundler raises on purpose."""

    exit_code: int = ExitCode.INTERNAL


class BuildUsageError(BuildError):
    """An option or input the operator gave cannot be used (exit 2, like click's own)."""

    exit_code = ExitCode.USAGE


class KeyFileError(BuildError):
    """The signing key cannot be used: missing, unreadable, not Ed25519, or locked."""

    exit_code = ExitCode.KEY


# -- the repository: its git objects, gitops.yaml, templates ---------------------------


class RepoError(BuildError):
    """The repository or the commit cannot be turned into a bundle as it stands."""

    exit_code = ExitCode.REPO


class GitError(RepoError):
    """A git command failed, or the revision/path/object it was asked for does not exist."""


class RepoConfigError(RepoError):
    """``gitops.yaml`` (or a vars file) is invalid; the message names file and line."""


class TemplateRenderError(RepoError):
    """A Jinja2 template failed: syntax, undefined variable, missing include (file:line)."""


class MissingSourceError(RepoConfigError):
    """A ``files[].src`` in ``gitops.yaml`` names no regular file in the commit."""


class ManifestTooLargeError(RepoError):
    """The hosts selected would make a manifest larger than a host accepts."""


class OutputError(BuildError):
    """The bundle file cannot be written (disk full, permission denied)."""

    exit_code = ExitCode.IO


class WheelhouseError(BuildError):
    """The wheelhouse for offline installs cannot be written (pip failed, no source)."""

    exit_code = ExitCode.IO
