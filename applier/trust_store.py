"""The host's trust root on disk, and adopting a verified rotation (``trust.py``) into it.

The trust root is two files in ``<root>/etc/gitops-apply``: the allowed_signers file
that ``config.yaml`` names, and ``config.yaml``'s ``threshold`` and ``trust_sequence``.
A rotation writes the new set to a *new* file (``allowed_signers.<sequence>``), then
replaces ``config.yaml`` atomically to point at it: that rename is the single commit
point, so a crash leaves the old trust or the new one, never a mix of the new keys
with the old threshold. The previous allowed_signers file is removed afterwards.
Not for: deciding whether to adopt (``trust.py``).
"""

from __future__ import annotations

import dataclasses
import logging

from applier import _fs
from applier.config import HostConfig, write_config
from applier.errors import HostConfigError
from applier.paths import HostLayout
from applier.sshsig import AllowedSigners
from applier.state import State
from applier.trust import Rotation, TrustRoot

logger = logging.getLogger(__name__)


def load_root(layout: HostLayout, config: HostConfig) -> TrustRoot:
    path = layout.config_dir / config.allowed_signers
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HostConfigError(f"{path}: cannot read trusted signers: {e.strerror}") from e
    return TrustRoot(text, config.threshold, config.trust_sequence)


def adopt(layout: HostLayout, config: HostConfig, state: State,
          rotation: Rotation) -> HostConfig:
    """Make ``rotation`` the host's trust; log it; return the new config."""
    old_root = load_root(layout, config)
    old = AllowedSigners.from_text(old_root.allowed_signers, config.allowed_signers)
    name = f"allowed_signers.{rotation.sequence}"
    _fs.atomic_write(layout.config_dir / name, rotation.update.allowed_signers.encode("utf-8"),
                     0o644, fault="trust-signers")
    new_config = dataclasses.replace(config, allowed_signers=name,
                                     threshold=rotation.update.threshold,
                                     trust_sequence=rotation.sequence)
    write_config(new_config, layout.config_file, layout.config_cache, fault="trust-config")
    if config.allowed_signers != name:
        _fs.remove_quietly(layout.config_dir / config.allowed_signers)
    before = {e.key.fingerprint for e in old.entries}
    after = {e.key.fingerprint for e in rotation.policy.signers.entries}
    state.audit(
        "trust", bundle_id=rotation.bundle_id, sequence=rotation.sequence,
        threshold=rotation.update.threshold, previous_threshold=config.threshold,
        signers=sorted(after), added=sorted(after - before), revoked=sorted(before - after),
        reset_sequence=rotation.reset_sequence,
        signed_by_old=[s.fingerprint for s in rotation.old_signers],
        signed_by_new=[s.fingerprint for s in rotation.new_signers], result="ok",
    )
    logger.info("adopted the trust update of bundle %s: %d key(s), threshold %d%s",
                rotation.bundle_id, len(after), rotation.update.threshold,
                ", sequence reset" if rotation.reset_sequence else "")
    return new_config
