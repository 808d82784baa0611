"""Workstation signing: key loading, passphrases, and signatures ssh-keygen accepts.

Keys come from real ``ssh-keygen -t ed25519`` and every signature we make is checked by
``ssh-keygen -Y verify``, the tool hosts' operators would reach for by hand.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from applier.errors import ExitCode
from applier.sshsig import AllowedSigners, parse_signatures, verify_manifest_signatures
from bundler.errors import BuildError, KeyFileError
from bundler.signing import SigningKey, load_signing_key, passphrase_for, sign, sign_digest

MESSAGE = b'{"bundle_id":"7-0123456789ab","format":1}'
NOW = 1_780_000_000


def keygen(directory: Path, name: str = "release", key_type: str = "ed25519",
           passphrase: str = "") -> Path:
    path = directory / name
    args = ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-C", name, "-f", str(path)]
    subprocess.run(args, check=True, capture_output=True)
    return path


def allowed_line(key: Path, principal: str = "release@example.org") -> str:
    pub = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    return f"{principal} {pub}\n"


def ssh_verify(tmp_path: Path, key: Path, sig: bytes, message: bytes = MESSAGE,
               namespace: str = "gitops-bundle") -> subprocess.CompletedProcess[str]:
    (tmp_path / "allowed_signers").write_text(allowed_line(key))
    (tmp_path / "manifest.json.sig").write_bytes(sig)
    return subprocess.run(
        ["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed_signers"),
         "-I", "release@example.org", "-n", namespace, "-s", str(tmp_path / "manifest.json.sig")],
        input=message.decode(), capture_output=True, text=True, check=False,
    )


def ssh_sign(key: Path, message: bytes, namespace: str = "gitops-bundle") -> bytes:
    done = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", namespace, "-f", str(key), "-"],
                          input=message, check=True, capture_output=True)
    return done.stdout


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return keygen(tmp_path)


@pytest.fixture
def encrypted_key(tmp_path: Path) -> Path:
    return keygen(tmp_path, "locked", passphrase="secret")


# -- signatures ---------------------------------------------------------------------------


def test_signature_is_accepted_by_ssh_keygen(tmp_path: Path, key_path: Path) -> None:
    sig = sign(MESSAGE, load_signing_key(key_path, None))
    done = ssh_verify(tmp_path, key_path, sig)
    assert done.returncode == 0, done.stderr
    assert 'Good "gitops-bundle" signature for release@example.org' in done.stdout


def test_signature_is_byte_identical_to_ssh_keygen(key_path: Path) -> None:
    # Ed25519 is deterministic, so the same key, message and namespace must give the
    # same file: same hash (sha512), same field order, same 70-column armor.
    ours = sign(MESSAGE, load_signing_key(key_path, None))
    assert ours == ssh_sign(key_path, MESSAGE)
    lines = ours.decode().splitlines()
    assert all(len(line) == 70 for line in lines[1:-2])
    assert len(lines[-2]) <= 70
    assert ours.endswith(b"-----END SSH SIGNATURE-----\n")


def test_a_digest_signs_as_its_message_does(key_path: Path) -> None:
    # A build hashes the manifest as it writes it and signs that digest: the same
    # signature as ssh-keygen's over the bytes; a digest of another algorithm is refused.
    key = load_signing_key(key_path, None)
    assert sign_digest(hashlib.sha512(MESSAGE).digest(), key) == ssh_sign(key_path, MESSAGE)
    with pytest.raises(ValueError, match="a sha512 digest has 64 bytes, not 32"):
        sign_digest(hashlib.sha256(MESSAGE).digest(), key)


def test_signature_verifies_with_the_applier(key_path: Path) -> None:
    key = load_signing_key(key_path, None)
    trusted = AllowedSigners.from_text(allowed_line(key_path), "allowed_signers")
    (signer,) = verify_manifest_signatures(MESSAGE, sign(MESSAGE, key), trusted, NOW)
    assert signer.fingerprint == key.fingerprint
    assert parse_signatures(sign(MESSAGE, key))[0].hash_algorithm == "sha512"


def test_other_namespace_is_not_a_bundle_signature(tmp_path: Path, key_path: Path) -> None:
    sig = sign(MESSAGE, load_signing_key(key_path, None), namespace="file")
    assert ssh_verify(tmp_path, key_path, sig, namespace="file").returncode == 0
    assert ssh_verify(tmp_path, key_path, sig).returncode != 0


def test_co_signing_with_ssh_keygen_appends(tmp_path: Path, key_path: Path) -> None:
    # A second signer (here: ssh-keygen, as with an agent or a FIDO key) appends its
    # block; the host counts both keys.
    other = keygen(tmp_path, "second")
    sig = sign(MESSAGE, load_signing_key(key_path, None)) + ssh_sign(other, MESSAGE)
    trusted = AllowedSigners.from_text(
        allowed_line(key_path) + allowed_line(other, "second@example.org"), "allowed_signers")
    assert len(verify_manifest_signatures(MESSAGE, sig, trusted, NOW, threshold=2)) == 2


def test_fingerprint_matches_ssh_keygen(key_path: Path) -> None:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(key_path.with_suffix(".pub"))],
                         check=True, capture_output=True, text=True).stdout
    assert load_signing_key(key_path, None).fingerprint == out.split()[1]


def test_repr_does_not_show_the_private_key(key_path: Path) -> None:
    key = load_signing_key(key_path, None)
    assert isinstance(key, SigningKey)
    assert "private" not in repr(key)
    assert str(key_path) in repr(key)


# -- passphrases --------------------------------------------------------------------------


def test_encrypted_key_opens_with_passphrase_from_environment(
    tmp_path: Path, encrypted_key: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GITOPS_KEY_PASSPHRASE", "secret")
    passphrase = passphrase_for(encrypted_key, interactive=False)
    assert passphrase == b"secret"
    sig = sign(MESSAGE, load_signing_key(encrypted_key, passphrase))
    (tmp_path / "locked.pub").rename(tmp_path / "release.pub")
    assert ssh_verify(tmp_path, tmp_path / "release", sig).returncode == 0


def test_a_passphrase_that_is_not_utf8_is_passed_as_its_bytes(tmp_path: Path) -> None:
    """A Latin-1 terminal set the passphrase: os.environ holds it surrogate-escaped,
    and the key opens with the exact bytes, not a UnicodeEncodeError."""
    latin1 = "gr\udce4ssli"  # b"gr\xe4ssli" as os.environ decodes it
    key = keygen(tmp_path, "latin", passphrase=latin1)  # argv: the same bytes again
    passphrase = passphrase_for(key, environ={"GITOPS_KEY_PASSPHRASE": latin1},
                                interactive=False)
    assert passphrase == b"gr\xe4ssli"
    assert load_signing_key(key, passphrase).fingerprint.startswith("SHA256:")


def test_passphrase_env_var_name_is_configurable(encrypted_key: Path) -> None:
    assert passphrase_for(encrypted_key, "MY_PASS", environ={"MY_PASS": "secret"},
                          interactive=False) == b"secret"


def test_prompt_is_used_only_on_a_terminal(encrypted_key: Path) -> None:
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "secret"

    assert passphrase_for(encrypted_key, environ={}, prompt=prompt, interactive=True) == (
        b"secret")
    assert asked == [f"Enter passphrase for {encrypted_key}: "]
    with pytest.raises(KeyFileError, match=r"locked is encrypted: set GITOPS_KEY_PASSPHRASE$"):
        passphrase_for(encrypted_key, environ={}, prompt=prompt, interactive=False)
    assert len(asked) == 1


def test_environment_wins_over_the_prompt(encrypted_key: Path) -> None:
    def prompt(text: str) -> str:
        raise AssertionError(text)

    assert passphrase_for(encrypted_key, environ={"GITOPS_KEY_PASSPHRASE": "secret"},
                          prompt=prompt, interactive=True) == b"secret"


def test_unencrypted_key_needs_no_passphrase(key_path: Path) -> None:
    def prompt(text: str) -> str:
        raise AssertionError(text)

    assert passphrase_for(key_path, environ={"GITOPS_KEY_PASSPHRASE": "x"}, prompt=prompt,
                          interactive=True) is None
    # A passphrase given anyway (a shell-wide variable) does no harm.
    assert load_signing_key(key_path, b"unused").public_key.key_type == "ssh-ed25519"


# -- key file errors ----------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


KEY_ERRORS = {
    "missing": (lambda d: d / "nope", None, r"nope: no such key file"),
    "directory": (lambda d: d, None, r"cannot read key file: Is a directory"),
    "wrong-passphrase": (lambda d: keygen(d, "k", passphrase="secret"), b"guess",
                         r"k: wrong passphrase"),
    "encrypted-no-passphrase": (lambda d: keygen(d, "k", passphrase="secret"), None,
                                r"k is encrypted: set GITOPS_KEY_PASSPHRASE"),
    "rsa-key": (lambda d: keygen(d, "k", "rsa"), None,
                r"k: RSA key; only Ed25519 keys can sign bundles"),
    "ecdsa-key": (lambda d: keygen(d, "k", "ecdsa"), None,
                  r"k: ECDSA key; only Ed25519 keys can sign bundles"),
    "public-key-file": (lambda d: keygen(d, "k").with_suffix(".pub"), None,
                        r"k.pub: not an OpenSSH private key"),
    "garbage": (lambda d: _write(d, "k", b"hello\n"), None, r"k: not an OpenSSH private key"),
    "huge": (lambda d: _write(d, "k", b"\0" * ((1 << 20) + 1)), None,
             r"k: not an OpenSSH private key \(larger than 1 MiB\)"),
}


@pytest.mark.parametrize(("make", "passphrase", "match"), KEY_ERRORS.values(),
                         ids=KEY_ERRORS.keys())
def test_key_file_errors(tmp_path: Path, make: object, passphrase: bytes | None,
                         match: str) -> None:
    assert callable(make)
    path = make(tmp_path)
    assert isinstance(path, Path)
    with pytest.raises(KeyFileError, match=match) as raised:
        load_signing_key(path, passphrase)
    message = str(raised.value)
    assert message.startswith(str(path))
    assert "\n" not in message
    assert raised.value.exit_code == ExitCode.KEY
    assert isinstance(raised.value, BuildError)


def test_passphrase_for_a_missing_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"nope: no such key file"):
        passphrase_for(tmp_path / "nope", environ={}, interactive=False)


def test_empty_namespace_is_refused(key_path: Path) -> None:
    with pytest.raises(ValueError, match="namespace"):
        sign(MESSAGE, load_signing_key(key_path, None), namespace="")
