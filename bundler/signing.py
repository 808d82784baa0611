"""Signing manifests on the workstation with an OpenSSH Ed25519 private key.

For: loading the key file that ``ssh-keygen -t ed25519`` writes (with or without a
passphrase), finding that passphrase (environment variable, else a prompt on a
terminal), and making the armored SSHSIG exactly as ``ssh-keygen -Y sign -n
gitops-bundle`` would. The signature format comes from ``applier.sshsig``, so the
builder and the hosts share one definition of it.

Not for: keys held by ssh-agent or a FIDO token (sign with ``ssh-keygen -Y sign`` and
append its output to ``manifest.json.sig``; hosts accept those signatures alike), or
verifying signatures (``applier.sshsig``).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
)

from applier.sshsig import (
    NAMESPACE,
    PublicKey,
    Signature,
    ed25519_signature_blob,
    signed_data_of_digest,
)
from bundler.errors import KeyFileError

PASSPHRASE_ENV = "GITOPS_KEY_PASSPHRASE"  # noqa: S105 - the variable's name, no secret
# ssh-keygen signs the SHA-512 of the message by default; doing the same keeps our
# signatures indistinguishable from ones made with ssh-keygen.
HASH_ALGORITHM = "sha512"
_MAX_KEY_FILE = 1 << 20  # a private key file is a few hundred bytes
_OTHER_KINDS = ((rsa.RSAPrivateKey, "RSA"), (ec.EllipticCurvePrivateKey, "ECDSA"),
                (dsa.DSAPrivateKey, "DSA"))


@dataclass(frozen=True)
class SigningKey:
    """A loaded Ed25519 private key and the public key hosts list in allowed_signers."""

    path: Path
    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: PublicKey

    @property
    def fingerprint(self) -> str:
        return self.public_key.fingerprint


def _read_key(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError as e:
        raise KeyFileError(f"{path}: no such key file") from e
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key file: {e.strerror or e}") from e
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path}: not an OpenSSH private key (larger than 1 MiB)")
    return data


def _is_encrypted(data: bytes) -> bool:
    # cryptography raises TypeError (and only then) when a key needs a password that
    # was not given; anything else wrong with the file is load_signing_key's to report.
    try:
        load_ssh_private_key(data, password=None)
    except TypeError:
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return False


def passphrase_for(
    path: Path,
    env_var: str = PASSPHRASE_ENV,
    *,
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    interactive: bool | None = None,
) -> bytes | None:
    """The passphrase to open ``path`` with, or None if the key is not encrypted.

    From ``env_var`` if it is set, else asked with ``prompt`` (getpass) only when
    ``interactive`` (stdin is a terminal): a build in CI must fail, not hang.
    ``environ``, ``prompt`` and ``interactive`` exist so tests can stand in for them.
    """
    if not _is_encrypted(_read_key(path)):
        return None
    env = os.environ if environ is None else environ
    value = env.get(env_var)
    if value is not None:
        # os.environ decodes with surrogateescape: this gives back the exact bytes,
        # whatever their encoding (a passphrase set in Latin-1 is still that passphrase).
        return os.fsencode(value)
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise KeyFileError(f"{path} is encrypted: set {env_var}")
    ask = getpass.getpass if prompt is None else prompt
    return ask(f"Enter passphrase for {path}: ").encode("utf-8")


def load_signing_key(path: Path, passphrase: bytes | None) -> SigningKey:
    """Load an OpenSSH-format Ed25519 private key; raise ``KeyFileError`` naming ``path``."""
    data = _read_key(path)
    encrypted = _is_encrypted(data)
    if encrypted and passphrase is None:
        raise KeyFileError(f"{path} is encrypted: set {PASSPHRASE_ENV}")
    try:
        # A passphrase for a key that has none is harmless: ignore it rather than fail.
        key = load_ssh_private_key(data, password=passphrase if encrypted else None)
    except UnsupportedAlgorithm as e:
        # cryptography decrypts OpenSSH keys (bcrypt KDF) only if bcrypt is installed.
        if "bcrypt" in str(e):
            raise KeyFileError(f"{path}: cannot decrypt the key: the Python package "
                               "'bcrypt' is not installed") from e
        raise KeyFileError(f"{path}: unsupported key or encryption: {e}") from e
    except (ValueError, TypeError) as e:
        if encrypted:
            raise KeyFileError(f"{path}: wrong passphrase") from e
        raise KeyFileError(f"{path}: not an OpenSSH private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        kind = next((name for cls, name in _OTHER_KINDS if isinstance(key, cls)),
                    type(key).__name__)
        raise KeyFileError(f"{path}: {kind} key; only Ed25519 keys can sign bundles")
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SigningKey(path, key, PublicKey.ed25519(raw))


def sign(message: bytes, key: SigningKey, namespace: str = NAMESPACE) -> bytes:
    """The armored SSHSIG over ``message``, byte for byte what ssh-keygen would write."""
    return sign_digest(hashlib.new(HASH_ALGORITHM, message).digest(), key, namespace)


def sign_digest(digest: bytes, key: SigningKey, namespace: str = NAMESPACE) -> bytes:
    """``sign`` for a message the caller hashed with ``HASH_ALGORITHM`` as it wrote it."""
    if not namespace:
        raise ValueError("the signature namespace must not be empty")
    raw = key.private_key.sign(signed_data_of_digest(namespace, HASH_ALGORITHM, digest))
    signature = Signature(key.public_key, namespace, HASH_ALGORITHM,
                          ed25519_signature_blob(raw))
    return signature.armor()
