"""SSHSIG verification and allowed_signers parsing, checked against real ssh-keygen.

ssh-keygen is the reference implementation: signatures it makes must verify here, and
its trust decisions (namespaces, validity windows) must equal ours. FIDO signatures
cannot be made without hardware, so the test plays the authenticator (PROTOCOL.u2f)
and has ssh-keygen confirm that the hand-made signature is well formed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from applier import _sshwire as wire
from applier.errors import ExitCode, HostConfigError, SignatureError
from applier.sshsig import (
    MAX_SIG_FILE,
    MAX_SIGNATURES,
    NAMESPACE,
    SK_ED25519,
    AllowedSigners,
    PublicKey,
    Signature,
    parse_signatures,
    signature_fingerprints,
    signed_data,
    verify_manifest_signatures,
    verify_one,
)

MESSAGE = b'{"format":1,"hosts":{"frodo":{}}}'
NOW = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp())


# -- ssh-keygen, the reference --------------------------------------------------------------


def keygen(directory: Path, name: str, key_type: str = "ed25519", passphrase: str = "") -> Path:
    path = directory / name
    args = ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-C", name, "-f", str(path)]
    if key_type == "rsa":
        args += ["-b", "2048"]  # the smallest ssh-keygen allows: fast enough for a test
    subprocess.run(args, check=True, capture_output=True)
    return path


def ssh_sign(key: Path, message: bytes, namespace: str = NAMESPACE,
             hashalg: str | None = None) -> bytes:
    args = ["ssh-keygen", "-Y", "sign", "-n", namespace, "-f", str(key)]
    if hashalg is not None:
        args += ["-O", f"hashalg={hashalg}"]
    # Signing stdin writes the armored signature to stdout.
    done = subprocess.run([*args, "-"], input=message, check=True, capture_output=True)
    return done.stdout


def ssh_verify(tmp_path: Path, allowed: str, principal: str, sig: bytes, *, message: bytes,
               verify_time: int | None = None) -> bool:
    (tmp_path / "allowed_signers").write_text(allowed)
    (tmp_path / "msg.sig").write_bytes(sig)
    args = ["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed_signers"),
            "-I", principal, "-n", NAMESPACE, "-s", str(tmp_path / "msg.sig")]
    if verify_time is not None:
        stamp = datetime.fromtimestamp(verify_time, UTC).strftime("%Y%m%d%H%M%SZ")
        args += ["-O", f"verify-time={stamp}"]
    return subprocess.run(args, input=message, capture_output=True, check=False).returncode == 0


def ssh_fingerprint(pub_line: str, directory: Path) -> str:
    path = directory / "fp.pub"
    path.write_text(pub_line + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


@dataclass(frozen=True)
class Signer:
    name: str
    key: Path
    pub: str  # "ssh-ed25519 AAAA..." without comment

    def line(self, options: str = "") -> str:
        return f"{self.name}@example.org {options + ' ' if options else ''}{self.pub}\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Signer]:
    directory = tmp_path_factory.mktemp("keys")
    out = {}
    for name, key_type in (("alice", "ed25519"), ("bob", "ed25519"), ("carol", "ed25519"),
                           ("rsa", "rsa"), ("ecdsa", "ecdsa")):
        key = keygen(directory, name, key_type)
        pub = " ".join(key.with_suffix(".pub").read_text().split()[:2])
        out[name] = Signer(name, key, pub)
    return out


@pytest.fixture(scope="module")
def alice_sig(keys: dict[str, Signer]) -> bytes:
    return ssh_sign(keys["alice"].key, MESSAGE)


def trust(*lines: str) -> AllowedSigners:
    return AllowedSigners.from_text("".join(lines), "allowed_signers")


# -- signatures made by ssh-keygen verify here ----------------------------------------------


def test_ssh_keygen_signature_verifies(keys: dict[str, Signer], alice_sig: bytes) -> None:
    alice = keys["alice"]
    (signer,) = verify_manifest_signatures(MESSAGE, alice_sig, trust(alice.line()), NOW)
    assert signer.principals == ("alice@example.org",)
    assert signer.fingerprint == ssh_fingerprint(alice.pub, alice.key.parent)
    assert signer.key == PublicKey.from_openssh_line(alice.pub)


@pytest.mark.parametrize("hashalg", ["sha256", "sha512"])
def test_both_hash_algorithms_verify(keys: dict[str, Signer], hashalg: str) -> None:
    sig = ssh_sign(keys["alice"].key, MESSAGE, hashalg=hashalg)
    assert parse_signatures(sig)[0].hash_algorithm == hashalg
    assert verify_one(MESSAGE, parse_signatures(sig)[0], NAMESPACE).key_type == "ssh-ed25519"


def test_armor_round_trips_byte_for_byte(alice_sig: bytes) -> None:
    (sig,) = parse_signatures(alice_sig)
    assert sig.armor() == alice_sig
    assert Signature.from_blob(sig.to_blob()) == sig


def test_co_signed_file_meets_threshold(keys: dict[str, Signer], alice_sig: bytes) -> None:
    bob_sig = ssh_sign(keys["bob"].key, MESSAGE)
    trusted = trust(keys["alice"].line(), keys["bob"].line())
    signers = verify_manifest_signatures(MESSAGE, alice_sig + b"\n" + bob_sig, trusted, NOW,
                                         threshold=2)
    assert [s.principals for s in signers] == [("alice@example.org",), ("bob@example.org",)]


def test_untrusted_cosigner_is_ignored(keys: dict[str, Signer], alice_sig: bytes) -> None:
    carol_sig = ssh_sign(keys["carol"].key, MESSAGE)
    signers = verify_manifest_signatures(MESSAGE, carol_sig + alice_sig,
                                         trust(keys["alice"].line()), NOW)
    assert [s.fingerprint for s in signers] == signature_fingerprints(alice_sig)


def test_principals_of_every_matching_line_are_reported(keys: dict[str, Signer],
                                                        alice_sig: bytes) -> None:
    pub = keys["alice"].pub
    trusted = trust(f"a@x,*@ops {pub}\n", f'"b@x" namespaces="gitops-*" {pub}\n',
                    f'c@x namespaces="file" {pub}\n')
    (signer,) = verify_manifest_signatures(MESSAGE, alice_sig, trusted, NOW)
    assert signer.principals == ("a@x", "*@ops", "b@x")


def test_fingerprints_name_every_signer_without_trust(keys: dict[str, Signer],
                                                      alice_sig: bytes) -> None:
    rsa_sig = ssh_sign(keys["rsa"].key, MESSAGE)
    fps = signature_fingerprints(alice_sig + rsa_sig)
    directory = keys["alice"].key.parent
    assert fps == [ssh_fingerprint(keys["alice"].pub, directory),
                   ssh_fingerprint(keys["rsa"].pub, directory)]


def test_rsa_signature_is_parsed_but_never_verifies(keys: dict[str, Signer]) -> None:
    (sig,) = parse_signatures(ssh_sign(keys["rsa"].key, MESSAGE))
    assert sig.public_key.key_type == "ssh-rsa"
    with pytest.raises(SignatureError, match=r"unsupported key type ssh-rsa"):
        verify_one(MESSAGE, sig, NAMESPACE)


# -- rejections -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    sig: Callable[[dict[str, Signer], bytes], bytes]
    match: str
    allowed: Callable[[dict[str, Signer]], str] = lambda k: k["alice"].line()
    message: bytes = MESSAGE
    threshold: int = 1


def _alice(options: str) -> Callable[[dict[str, Signer]], str]:
    return lambda k: k["alice"].line(options)


def _armor_blob(blob: bytes) -> bytes:
    """Armor any bytes, well-formed SSHSIG or not (Signature.armor needs a valid one)."""
    b64 = base64.b64encode(blob).decode()
    return ("-----BEGIN SSH SIGNATURE-----\n" + b64 + "\n-----END SSH SIGNATURE-----\n").encode()


def _reblob(sig: bytes, change: Callable[[bytes], bytes]) -> bytes:
    return _armor_blob(change(base64.b64decode(b"".join(sig.splitlines()[1:-1]))))


def _with_field(sig: bytes, **fields: str) -> bytes:
    parsed = parse_signatures(sig)[0]
    names = {"namespace": parsed.namespace, "hash_algorithm": parsed.hash_algorithm} | fields
    return Signature(parsed.public_key, names["namespace"], names["hash_algorithm"],
                     parsed.signature, parsed.reserved).armor()


NEGATIVE = {
    "wrong-namespace": Case(
        lambda k, s: ssh_sign(k["alice"].key, MESSAGE, namespace="file"),
        r"signed by SHA256:\S+: namespace 'file' is not 'gitops-bundle'"),
    "tampered-message": Case(lambda k, s: s, r"signed by SHA256:\S+: bad signature",
                             message=MESSAGE + b" "),
    "untrusted-key": Case(
        lambda k, s: ssh_sign(k["bob"].key, MESSAGE),
        r"^manifest\.json\.sig: 0 of 1 required trusted signatures \(signed by SHA256:\S+ "
        r"which is not in allowed_signers\)$"),
    "truncated-armor": Case(lambda k, s: s[: len(s) // 2],
                            r"manifest\.json\.sig:1: truncated signature"),
    "no-end-line": Case(lambda k, s: s.replace(b"-----END SSH SIGNATURE-----\n", b""),
                        r"truncated signature: no -----END SSH SIGNATURE-----"),
    "garbage-after-block": Case(lambda k, s: s + b"trailing words\n",
                                r"manifest\.json\.sig:\d+: unexpected text outside"),
    "garbage-between-blocks": Case(lambda k, s: s + b"x\n" + s, r"unexpected text outside"),
    "garbage-before-block": Case(lambda k, s: b"x\n" + s, r"does not start with -----BEGIN"),
    "empty-file": Case(lambda k, s: b"", r"does not start with -----BEGIN"),
    "begin-inside-block": Case(lambda k, s: s.replace(b"-----END SSH SIGNATURE-----\n", b"") + s,
                               r"new signature before -----END"),
    "bad-base64": Case(lambda k, s: s.replace(s.splitlines()[1][:4], b"@@@@"),
                       r"signature is not valid base64"),
    "not-ascii": Case(lambda k, s: s.replace(b"U1NI", b"\xc3\xa9NI"), r"not ASCII"),
    "oversize": Case(lambda k, s: s + b"\n" * MAX_SIG_FILE, r"more than 65536"),
    "too-many-blocks": Case(lambda k, s: s * (MAX_SIGNATURES + 1),
                            r"more than 32 signatures"),
    "trailing-wire-bytes": Case(lambda k, s: _reblob(s, lambda b: b + b"\0"),
                                r"malformed signature: SSHSIG: 1 unexpected trailing bytes"),
    "truncated-wire": Case(lambda k, s: _reblob(s, lambda b: b[:-10]),
                           r"malformed signature: SSHSIG: truncated signature"),
    "huge-length": Case(lambda k, s: _reblob(s, lambda b: b[:10] + b"\xff\xff\xff\xff" + b[14:]),
                        r"malformed signature: SSHSIG: truncated public key"),
    "bad-magic": Case(lambda k, s: _reblob(s, lambda b: b"SSHSIH" + b[6:]),
                      r"missing SSHSIG magic"),
    "version-2": Case(lambda k, s: _reblob(s, lambda b: b[:6] + wire.u32(2) + b[10:]),
                      r"unsupported version 2"),
    "unsupported-hash": Case(lambda k, s: _with_field(s, hash_algorithm="md5"),
                             r"unsupported hash algorithm 'md5'"),
    "namespace-relabelled": Case(lambda k, s: _with_field(s, namespace="gitops-bundle2"),
                                 r"namespace 'gitops-bundle2' is not 'gitops-bundle'"),
    "hash-relabelled": Case(lambda k, s: _with_field(s, hash_algorithm="sha256"),
                            r"bad signature"),
    "valid-before-in-the-past": Case(
        lambda k, s: s, r"which allowed_signers lists but expired at 2026-01-01T00:00:00Z",
        allowed=_alice('valid-before="20260101Z"')),
    "valid-after-in-the-future": Case(
        lambda k, s: s, r"not valid before 2027-01-01T00:00:00Z",
        allowed=_alice('valid-after="20270101Z"')),
    "namespaces-exclude-bundles": Case(
        lambda k, s: s, r"lists but not allowed for namespace 'gitops-bundle'",
        allowed=_alice('namespaces="git,file"')),
    "namespaces-negated": Case(
        lambda k, s: s, r"not allowed for namespace 'gitops-bundle'",
        allowed=_alice('namespaces="*,!gitops-*"')),
    "threshold-2-one-signer": Case(
        lambda k, s: s, r"1 of 2 required trusted signatures \(the file holds 1 signature",
        threshold=2),
    "same-key-twice-counts-once": Case(
        lambda k, s: s + s,
        r"1 of 2 required trusted signatures \(the file holds 2 signature\(s\) by 1 distinct",
        threshold=2),
    "threshold-2-with-untrusted-cosigner": Case(
        lambda k, s: s + ssh_sign(k["bob"].key, MESSAGE),
        r"^manifest\.json\.sig: 1 of 2 required trusted signatures \(signed by SHA256:\S+ "
        r"which is not in allowed_signers\)$",
        threshold=2),
}


@pytest.mark.parametrize("case", NEGATIVE.values(), ids=NEGATIVE.keys())
def test_rejected(keys: dict[str, Signer], alice_sig: bytes, case: Case) -> None:
    sig = case.sig(keys, alice_sig)
    with pytest.raises(SignatureError, match=case.match) as raised:
        verify_manifest_signatures(case.message, sig, trust(case.allowed(keys)), NOW,
                                   threshold=case.threshold)
    assert "\n" not in str(raised.value)
    assert raised.value.exit_code == ExitCode.VERIFICATION


def test_exactly_32_signatures_are_accepted(alice_sig: bytes) -> None:
    assert len(parse_signatures(alice_sig * MAX_SIGNATURES)) == MAX_SIGNATURES


def test_blank_lines_and_crlf_between_blocks_are_accepted(keys: dict[str, Signer],
                                                          alice_sig: bytes) -> None:
    bob_sig = ssh_sign(keys["bob"].key, MESSAGE)
    data = (alice_sig + b"\n\n" + bob_sig).replace(b"\n", b"\r\n")
    assert len(parse_signatures(data)) == 2


def test_every_flipped_byte_is_rejected(keys: dict[str, Signer], alice_sig: bytes) -> None:
    # A signature altered anywhere (length, key, namespace, hash name, signature) must
    # fail as a SignatureError, never verify and never crash the parser.
    trusted = trust(keys["alice"].line())
    blob = parse_signatures(alice_sig)[0].to_blob()
    for i in range(len(blob)):
        flipped = blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]
        bad = _armor_blob(flipped)
        with pytest.raises(SignatureError):
            verify_manifest_signatures(MESSAGE, bad, trusted, NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_armored_bytes_raise_only_signature_error(body: bytes) -> None:
    data = _armor_blob(body)
    with contextlib.suppress(SignatureError):
        parse_signatures(data)


def test_threshold_below_one_is_a_config_error(keys: dict[str, Signer],
                                               alice_sig: bytes) -> None:
    with pytest.raises(HostConfigError, match="at least 1"):
        verify_manifest_signatures(MESSAGE, alice_sig, trust(keys["alice"].line()), NOW,
                                   threshold=0)


# -- allowed_signers --------------------------------------------------------------------------


def test_allowed_signers_format(keys: dict[str, Signer]) -> None:
    pub = keys["alice"].pub
    text = (
        "# ops team\n"
        "\n"
        f"   alice@example.org,*@ops.example.org {pub} alice's laptop\r\n"
        f'bob@example.org NAMESPACES="gitops-bundle,file",Valid-After="20260101",'
        f'valid-before="203001011200Z" {pub}\n'
        f'"carol@example.org" namespaces="with \\"quote\\" inside" {pub}\n'
    )
    a, b, c = AllowedSigners.from_text(text, "allowed_signers", tz=UTC).entries
    assert a.principals == ("alice@example.org", "*@ops.example.org")
    assert a.namespaces is None
    assert a.valid_after is None
    assert a.valid_before is None
    assert b.namespaces == ("gitops-bundle", "file")
    assert b.valid_after == int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    assert b.valid_before == int(datetime(2030, 1, 1, 12, tzinfo=UTC).timestamp())
    assert c.principals == ("carol@example.org",)
    assert c.namespaces == ('with "quote" inside',)
    assert a.key == b.key == c.key == PublicKey.from_openssh_line(pub)


def test_times_without_z_are_local(keys: dict[str, Signer]) -> None:
    line = keys["alice"].line('valid-after="20300101103000"')
    plus2 = timezone(timedelta(hours=2))
    (entry,) = AllowedSigners.from_text(line, "f", tz=plus2).entries
    assert entry.valid_after == int(datetime(2030, 1, 1, 10, 30, tzinfo=plus2).timestamp())
    (entry,) = AllowedSigners.from_text(line, "f").entries
    # The system zone, as ssh-keygen's mktime() uses.
    assert entry.valid_after == int(datetime(2030, 1, 1, 10, 30).timestamp())


BAD_LINES = {
    "cert-authority": ('*@example.org cert-authority {pub}', r"cert-authority is not supported"),
    "cert-authority-with-others": ('a@x namespaces="gitops-bundle",CERT-AUTHORITY {pub}',
                                   r"cert-authority is not supported"),
    "rsa-key": ("a@x {rsa}", (r"key type ssh-rsa is not supported \(only ssh-ed25519, "
                             r"sk-ssh-ed25519@openssh.com\)")),
    "ecdsa-key-after-options": ('a@x namespaces="x" {ecdsa}',
                                r"key type ecdsa-sha2-nistp256 is not supported"),
    "certificate-key": ("a@x ssh-ed25519-cert-v01@openssh.com AAAA",
                        r"is a certificate; certificates are not supported"),
    "unknown-option": ("a@x no-touch-required {pub}", r"unknown option 'no-touch-required'"),
    "unquoted-value": ("a@x namespaces=gitops-bundle {pub}", r"must be in double quotes"),
    "missing-end-quote": ('a@x namespaces="gitops-bundle {pub}', r"unterminated quote"),
    "duplicate-option": ('a@x namespaces="a",namespaces="b" {pub}',
                         r"multiple 'namespaces' options"),
    "trailing-comma": ('a@x namespaces="a", {pub}', r"options end with ','"),
    "junk-after-value": ('a@x namespaces="a"x {pub}', r"expected ',' after the namespaces"),
    "empty-namespace": ('a@x namespaces="a,,b" {pub}', r"empty namespace"),
    "bad-date": ('a@x valid-after="20261301Z" {pub}', r"invalid time '20261301Z'"),
    "short-date": ('a@x valid-after="2026" {pub}', r"invalid time '2026' \(want YYYYMMDD"),
    "window-inverted": ('a@x valid-after="20270101Z",valid-before="20260101Z" {pub}',
                        r"valid-before is not after valid-after"),
    "missing-key": ("a@x", r"expected 'principals \[options\] key-type base64-key'"),
    "missing-key-after-options": ('a@x namespaces="a"', r"missing key after the options"),
    "missing-base64": ("a@x ssh-ed25519", r"expected '<key type> <base64>'"),
    "bad-base64": ("a@x ssh-ed25519 AAAA!!!!", r"not valid base64"),
    "type-mismatch": ("a@x sk-ssh-ed25519@openssh.com {b64}",
                      r"key says sk-ssh-ed25519@openssh.com but its data is ssh-ed25519"),
    "truncated-key": ("a@x ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==",
                      r"key blob: truncated Ed25519 key"),
    "empty-principal": ("a@x,,b@x {pub}", r"empty principal"),
    # Files given in the wrong place: said so, and a private key's content not echoed.
    "public-key-without-principal": ("{pub}", (r"starts with the key type ssh-ed25519: a "
                                               r"public key \(\.pub\) line needs the "
                                               r"signer's name in front")),
    "private-key": ("-----BEGIN OPENSSH PRIVATE KEY-----",
                    (r"this is a private key, not a list of trusted public keys \([^']*"
                    r"'PRINCIPALS ssh-ed25519 AAAA\.\.\.'\); keep private keys off the "
                    r"hosts$")),
}


@pytest.mark.parametrize(("line", "match"), BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_allowed_signers_line(keys: dict[str, Signer], line: str, match: str) -> None:
    text = "# trusted release keys\n\n" + line.format(
        pub=keys["alice"].pub, rsa=keys["rsa"].pub, ecdsa=keys["ecdsa"].pub,
        b64=keys["alice"].pub.split()[1]) + "\n"
    with pytest.raises(HostConfigError, match=r"^/etc/allowed_signers:3: .*" + match):
        AllowedSigners.from_text(text, "/etc/allowed_signers")


def test_file_without_keys_is_rejected() -> None:
    with pytest.raises(HostConfigError, match=r"^allowed_signers: no signer keys$"):
        AllowedSigners.from_text("# nobody yet\n\n", "allowed_signers")


TRUST_DECISIONS = {
    "no-options": ("", NOW),
    "namespace-listed": ('namespaces="file,gitops-bundle"', NOW),
    "namespace-wildcard": ('namespaces="gitops-*"', NOW),
    "namespace-question-mark": ('namespaces="gitops-bundl?"', NOW),
    "namespace-not-listed": ('namespaces="git"', NOW),
    "namespace-negated": ('namespaces="*,!gitops-bundle"', NOW),
    "after-start": ('valid-after="20260101Z"', NOW),
    "before-start": ('valid-after="20260601000001Z"', NOW),
    "at-start": ('valid-after="20260601Z"', NOW),
    "before-end": ('valid-before="20260601000001Z"', NOW),
    "at-end": ('valid-before="20260601Z"', NOW),
    "after-end": ('valid-before="20260531235959Z"', NOW),
    "inside-window": ('valid-after="202601011200Z",valid-before="20270101Z"', NOW),
}


@pytest.mark.parametrize(("options", "now"), TRUST_DECISIONS.values(),
                         ids=TRUST_DECISIONS.keys())
def test_trust_decisions_agree_with_ssh_keygen(keys: dict[str, Signer], alice_sig: bytes,
                                               tmp_path: Path, options: str, now: int) -> None:
    line = keys["alice"].line(options)
    ours = bool(trust(line).signers_for(PublicKey.from_openssh_line(keys["alice"].pub),
                                        NAMESPACE, now))
    theirs = ssh_verify(tmp_path, line, "alice@example.org", alice_sig, message=MESSAGE,
                        verify_time=now)
    assert ours == theirs


# -- FIDO sk-ssh-ed25519 keys, signed the way an authenticator does --------------------------


@dataclass(frozen=True)
class Authenticator:
    """A stand-in FIDO token holding an Ed25519 key for one application."""

    private: Ed25519PrivateKey
    public: PublicKey

    @classmethod
    def new(cls, application: str = "ssh:") -> Authenticator:
        private = Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(private, PublicKey.sk_ed25519(raw, application))

    def sign(self, message: bytes, flags: int = 0x01, counter: int = 7,
             application: str | None = None, namespace: str = NAMESPACE) -> bytes:
        # PROTOCOL.u2f: the token signs sha256(application) || flags || counter ||
        # sha256(what ssh asked to sign); ssh wraps the result with flags and counter.
        data = signed_data(namespace, "sha512", message)
        app = (self.public.application if application is None else application).encode()
        signed = (hashlib.sha256(app).digest() + bytes([flags]) + wire.u32(counter)
                  + hashlib.sha256(data).digest())
        blob = (wire.string(SK_ED25519) + wire.string(self.private.sign(signed))
                + bytes([flags]) + wire.u32(counter))
        return Signature(self.public, namespace, "sha512", blob).armor()


def _resign_blob(sig: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """Change the key type's signature blob inside an otherwise well-formed SSHSIG."""
    s = parse_signatures(sig)[0]
    return Signature(s.public_key, s.namespace, s.hash_algorithm, change(s.signature)).armor()


def _sk_tamper(sig: bytes, offset_from_end: int) -> bytes:
    # The flags byte and counter are the last 5 bytes of the signature blob, which is
    # the last field of the SSHSIG blob.
    def flip(b: bytes) -> bytes:
        i = len(b) - offset_from_end
        return b[:i] + bytes([b[i] ^ 0x04]) + b[i + 1 :]
    return _reblob(sig, flip)


def test_sk_signature_verifies_here_and_in_ssh_keygen(tmp_path: Path) -> None:
    token = Authenticator.new()
    sig = token.sign(MESSAGE)
    line = f"fido@example.org {token.public.to_openssh()}\n"
    (signer,) = verify_manifest_signatures(MESSAGE, sig, trust(line), NOW)
    assert signer.key.key_type == SK_ED25519
    assert signer.key.application == "ssh:"
    # ssh-keygen accepting the hand-made signature proves the wire format is right.
    assert ssh_verify(tmp_path, line, "fido@example.org", sig, message=MESSAGE)
    assert signer.fingerprint == ssh_fingerprint(token.public.to_openssh(), tmp_path)


def test_sk_key_with_other_application_round_trips(tmp_path: Path) -> None:
    token = Authenticator.new("ssh:release")
    parsed = PublicKey.from_openssh_line(token.public.to_openssh() + " comment")
    assert parsed == token.public
    assert parsed.application == "ssh:release"
    sig = token.sign(MESSAGE)
    assert verify_one(MESSAGE, parse_signatures(sig)[0], NAMESPACE) == token.public
    assert ssh_verify(tmp_path, f"f@x {token.public.to_openssh()}\n", "f@x", sig, message=MESSAGE)


SK_NEGATIVE = {
    "user-presence-clear": (lambda t: t.sign(MESSAGE, flags=0x04),
                            r"did not confirm user presence \(flags 0x04\)"),
    "flags-tampered": (lambda t: _sk_tamper(t.sign(MESSAGE), 5), r"bad signature"),
    "counter-tampered": (lambda t: _sk_tamper(t.sign(MESSAGE), 1), r"bad signature"),
    "other-application": (lambda t: t.sign(MESSAGE, application="ssh:other"),
                          r"bad signature"),
    "tampered-message": (lambda t: t.sign(MESSAGE + b"!"), r"bad signature"),
    "wrong-namespace": (lambda t: t.sign(MESSAGE, namespace="file"),
                        r"namespace 'file' is not 'gitops-bundle'"),
    "missing-counter": (lambda t: _resign_blob(t.sign(MESSAGE), lambda b: b[:-4]),
                        r"malformed signature blob: truncated counter"),
    "trailing-bytes": (lambda t: _resign_blob(t.sign(MESSAGE), lambda b: b + b"\0"),
                       r"malformed signature blob: 1 unexpected trailing bytes"),
}


@pytest.mark.parametrize(("make", "match"), SK_NEGATIVE.values(), ids=SK_NEGATIVE.keys())
def test_sk_rejected(make: Callable[[Authenticator], bytes], match: str) -> None:
    token = Authenticator.new()
    (sig,) = parse_signatures(make(token))
    with pytest.raises(SignatureError, match=match):
        verify_one(MESSAGE, sig, NAMESPACE)


def test_sk_signature_without_user_presence_is_stricter_than_ssh_keygen(
    tmp_path: Path,
) -> None:
    # ssh-keygen -Y verify does not look at the flags; we refuse an untouched token.
    token = Authenticator.new()
    sig = token.sign(MESSAGE, flags=0x00)
    line = f"fido@example.org {token.public.to_openssh()}\n"
    assert ssh_verify(tmp_path, line, "fido@example.org", sig, message=MESSAGE)
    with pytest.raises(SignatureError, match=r"0 of 1 required .*did not confirm user presence"):
        verify_manifest_signatures(MESSAGE, sig, trust(line), NOW)


def test_ed25519_signature_cannot_pose_as_sk(keys: dict[str, Signer], alice_sig: bytes) -> None:
    # The same raw key as sk-ssh-ed25519 is a different key: its fingerprint differs
    # and a plain ssh-ed25519 signature blob does not verify under it.
    alice = PublicKey.from_openssh_line(keys["alice"].pub)
    as_sk = PublicKey.sk_ed25519(alice.raw)
    assert as_sk.fingerprint != alice.fingerprint
    sig = parse_signatures(alice_sig)[0]
    forged = Signature(as_sk, sig.namespace, sig.hash_algorithm, sig.signature)
    with pytest.raises(SignatureError, match=r"malformed signature blob: truncated flags"):
        verify_one(MESSAGE, forged, NAMESPACE)


# -- public keys ---------------------------------------------------------------------------


def test_public_key_line_round_trip(keys: dict[str, Signer]) -> None:
    alice = keys["alice"]
    key = PublicKey.from_openssh_line(alice.pub + " alice@laptop")
    assert key.to_openssh() == alice.pub
    assert key.fingerprint == ssh_fingerprint(alice.pub, alice.key.parent)
    assert len(key.raw) == 32


@pytest.mark.parametrize(
    ("line", "match"),
    [("ssh-ed25519", r"expected '<key type> <base64>'"),
     ("ssh-ed25519 %%%%", r"not valid base64"),
     ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", r"truncated Ed25519 key")],
    ids=["no-data", "bad-base64", "truncated"],
)
def test_bad_public_key_line(line: str, match: str) -> None:
    with pytest.raises(HostConfigError, match=r"^invalid public key: .*" + match):
        PublicKey.from_openssh_line(line)


def test_public_key_fields_must_agree_with_blob(keys: dict[str, Signer]) -> None:
    key = PublicKey.from_openssh_line(keys["alice"].pub)
    with pytest.raises(ValueError, match="not sk-ssh-ed25519"):
        PublicKey(SK_ED25519, key.blob)
    with pytest.raises(ValueError, match="application"):
        PublicKey(key.key_type, key.blob, "ssh:")
