"""Key rotation and revocation: may a bundle's signed trust update replace the host's trust?

Modelled on TUF's root rotation (python-tuf ``TrustedMetadataSet.update_root``): a
new trust root is adopted only if the bundle carrying it is signed by a threshold of
the keys the host trusts *now* (``verify.py`` already checked that) and by a threshold
of the keys in the *new* set, so neither the old keys alone nor the new keys alone can
move trust. A lost key is revoked the same way: a rotation whose new set lacks it.

Two anti-replay rules, because a rotation is the one thing that may reset the
sequence high-water mark (recovery from a fast-forward attack by a leaked key):

- a bundle whose trust update equals the host's current trust is an ordinary bundle
  (nothing to adopt, nothing reset), so re-carrying an update is harmless;
- a rotation is adopted only from a bundle whose sequence is above the one that
  carried the last adopted rotation (``HostConfig.trust_sequence``), never reset, so
  an old rotation (re-trusting a revoked key) cannot be replayed.

Pure: bytes, the current trust and ``now`` come in as arguments. Not for: writing the
adopted trust to the host (``trust_store.py``) or the replay/expiry checks (``policy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from applier.errors import HostConfigError, ReplayError, SignatureError, TrustUpdateError
from applier.manifest import TrustUpdate
from applier.sshsig import AllowedSigners, VerifiedSigner, verify_manifest_signatures
from applier.state import Current
from applier.verify import NAMESPACE, TrustPolicy, VerifiedManifest


@dataclass(frozen=True)
class TrustRoot:
    """What the host trusts now: the allowed_signers text, k, and the last rotation."""

    allowed_signers: str
    threshold: int
    sequence: int = 0  # sequence of the bundle whose rotation was adopted last


@dataclass(frozen=True)
class Rotation:
    """A verified trust update the host should adopt once the bundle is applied."""

    bundle_id: str
    sequence: int
    update: TrustUpdate
    policy: TrustPolicy  # the new trust, parsed
    old_signers: tuple[VerifiedSigner, ...]
    new_signers: tuple[VerifiedSigner, ...]

    @property
    def reset_sequence(self) -> bool:
        return self.update.reset_sequence

    @property
    def root(self) -> TrustRoot:
        return TrustRoot(self.update.allowed_signers, self.update.threshold, self.sequence)


def check_rotation(verified: VerifiedManifest, current: TrustRoot, now: int) -> Rotation | None:
    """The rotation ``verified`` asks for, checked; None if it carries none (or no change).

    ``verified`` must already carry a threshold of signatures by the current keys
    (``verify.verify_manifest``). Raises ``TrustUpdateError`` if the new set is invalid
    or too few of its keys signed, ``ReplayError`` for a rotation older than the last.
    """
    m = verified.manifest
    update = m.trust
    if update is None or (update.allowed_signers == current.allowed_signers
                          and update.threshold == current.threshold):
        return None
    if m.sequence <= current.sequence:
        raise ReplayError(
            f"bundle {m.bundle_id} carries a trust update at sequence {m.sequence}, not above "
            f"{current.sequence} of the last adopted rotation")
    source = f"bundle {m.bundle_id} trust update"
    try:
        new = AllowedSigners.from_text(update.allowed_signers, source)
    except HostConfigError as e:
        raise TrustUpdateError(str(e)) from e
    keys = len({e.key.blob for e in new.entries})
    if keys < update.threshold:
        raise TrustUpdateError(f"{source}: {keys} distinct key(s) cannot meet its threshold "
                               f"of {update.threshold}")
    try:
        new_signers = verify_manifest_signatures(
            verified.manifest_bytes, verified.signature_bytes, new, now,
            threshold=update.threshold, namespace=NAMESPACE)
    except SignatureError as e:
        raise TrustUpdateError(f"{source} is not signed by a threshold of the new keys: "
                               f"{e}") from e
    return Rotation(m.bundle_id, m.sequence, update, TrustPolicy(new, update.threshold),
                    verified.signers, new_signers)


def replay_floor(current: Current, rotation: Rotation | None) -> Current:
    """The state the replay check and the commit start from.

    Only an adopted rotation that asks for it resets the high-water marks (sequence,
    and the creation-time floor of ``policy.effective_now``, which a leaked key can
    push into the future as easily); the rotation bundle then sets both anew.
    """
    if rotation is None or not rotation.reset_sequence:
        return current
    return replace(current, highest_sequence=0, newest_created=0)
