"""The pure verification core: signed bytes + trusted keys + a clock value -> Manifest.

Modelled on python-tuf's trusted metadata set: this module opens no file, reads no
clock and runs no process. The caller (``bundle.py`` for the tar, ``apply.py`` for the
host) does the I/O and hands over bytes, the host's trust policy and ``now``. Steps
left to the caller: reading the tar members (``bundle.py``), hashing payload members
against the returned manifest (``bundle.py``), and host policy such as replay and
path prefixes (``policy.py``), which needs the host's state.

Order matters: the signature is checked over the exact manifest bytes *before* any
JSON is parsed, so a forged manifest never reaches the parser.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from applier.manifest import Manifest
from applier.sshsig import AllowedSigners, VerifiedSigner, verify_manifest_signatures

NAMESPACE = "gitops-bundle"


@dataclass(frozen=True)
class TrustPolicy:
    """Whom a host trusts: its allowed_signers and how many must sign (k of n)."""

    signers: AllowedSigners
    threshold: int = 1


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose exact bytes carry enough trusted signatures."""

    manifest: Manifest
    signers: tuple[VerifiedSigner, ...]
    manifest_bytes: bytes
    signature_bytes: bytes
    manifest_sha256: str


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes, trust: TrustPolicy,
                    now: int, host: str | None = None,
                    known: Callable[[str], Manifest | None] | None = None,
                    ) -> VerifiedManifest:
    """Check signatures over ``manifest_bytes``, then parse them; raise on any failure.

    With ``host``, the manifest returned is that host's view (``Manifest.from_bytes``).
    ``known`` maps a manifest's SHA-256 to the view this host built when it verified
    those very bytes before (or None): the signatures are checked all the same, only
    the parse is spared (a fleet manifest is tens of MB of JSON).
    """
    signers = verify_manifest_signatures(
        manifest_bytes, signature_bytes, trust.signers, now,
        threshold=trust.threshold, namespace=NAMESPACE,
    )
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    manifest = known(digest) if known is not None else None
    if manifest is None:
        manifest = Manifest.from_bytes(manifest_bytes, host)
    return VerifiedManifest(manifest, signers, manifest_bytes, signature_bytes, digest)
