"""One error tree for the applier (and the bundle format it owns).

Every class names its cause and carries the exit code the CLI maps it to, so the
mapping lives in exactly one place: ``ApplierError.exit_code``. Nothing here prints.
The numbers are the public contract documented in README.md ("Exit codes").
"""

from __future__ import annotations


class ExitCode:
    """Process exit codes shared by ``gitops-apply`` and ``gitops-bundle``."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    VERIFICATION = 3
    POLICY = 4
    VALIDATION = 5
    HEALTH = 6
    LOCKED = 7
    DRIFT = 8
    HOST_CONFIG = 9
    REPO = 10
    KEY = 11
    IO = 12


class ApplierError(Exception):
    """Base of every error the applier raises on purpose."""

    exit_code: int = ExitCode.INTERNAL


# -- the bundle is not exactly what a trusted key signed ---------------------------


class VerificationError(ApplierError):
    """The bundle failed verification: it changes nothing on the host."""

    exit_code = ExitCode.VERIFICATION


class SignatureError(VerificationError):
    """No (or too few) valid signatures by trusted keys over the manifest bytes."""


class FormatError(VerificationError):
    """The bundle is not a well-formed format-1 bundle (tar structure, compression)."""


class UnsafeMemberError(FormatError):
    """A tar member is a link, device, special file, or has an unsafe name or mode."""


class UnexpectedMemberError(FormatError):
    """A tar member is not named by the signed manifest, or is out of order/duplicated."""


class MissingMemberError(FormatError):
    """The signed manifest names a member that the tar does not contain."""


class DigestMismatchError(FormatError):
    """A member's size or SHA-256 differs from what the signed manifest says."""


class SizeLimitError(FormatError):
    """A member or the decompressed stream is larger than the format allows."""


class TrustUpdateError(VerificationError):
    """A bundle's key rotation is not signed by a threshold of the new keys, or is invalid."""


class ManifestError(VerificationError):
    """The (signed) manifest is malformed: bad JSON, unknown field, invalid value."""


# -- the bundle is genuine but this host refuses it ---------------------------------


class PolicyError(ApplierError):
    """Refused by the host's policy; nothing changed."""

    exit_code = ExitCode.POLICY


class ReplayError(PolicyError):
    """The bundle's sequence is not higher than the highest this host ever applied."""


class ExpiredError(PolicyError):
    """The bundle's signed expiry has passed."""


class PathPolicyError(PolicyError):
    """A target path lies outside the prefixes this host lets bundles write."""


class HostNotInBundleError(PolicyError):
    """The bundle has no entry for this host."""


class BadBundleError(PolicyError):
    """The bundle failed checks or health before; only ``apply --force`` retries it."""


# -- the host's checks refused the new files ------------------------------------------


class ValidationFailedError(ApplierError):
    """A ``validate`` or ``check`` command failed; the old files are in place."""

    exit_code = ExitCode.VALIDATION


class HealthCheckError(ApplierError):
    """A health check failed after the reload; the previous bundle was restored."""

    exit_code = ExitCode.HEALTH


class CommandError(ApplierError):
    """An ``on_change`` command failed after the swap (the transaction was rolled back)."""

    exit_code = ExitCode.HEALTH


# -- the host itself --------------------------------------------------------------------


class LockedError(ApplierError):
    """Another apply holds the state lock."""

    exit_code = ExitCode.LOCKED


class HostConfigError(ApplierError):
    """The host is not initialised, or its config.yaml / allowed_signers is invalid."""

    exit_code = ExitCode.HOST_CONFIG


class StateError(HostConfigError):
    """The state directory is inconsistent (e.g. a retained bundle is missing)."""


class NoRollbackTargetError(StateError):
    """There is no retained bundle to roll back to."""


class StoreDamagedError(StateError):
    """A content-store file no longer has the SHA-256 it is stored under (set aside)."""


class HostIOError(ApplierError):
    """The filesystem refused: disk full, permission denied, read-only."""

    exit_code = ExitCode.IO
