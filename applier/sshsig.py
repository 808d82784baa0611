"""OpenSSH signatures (SSHSIG) over manifest bytes, and the allowed_signers trust file.

For: parsing armored signatures (OpenSSH ``PROTOCOL.sshsig``), checking them with
``ssh-ed25519`` and FIDO ``sk-ssh-ed25519@openssh.com`` keys (``PROTOCOL.u2f``),
parsing an OpenSSH ``allowed_signers`` file (``ssh-keygen(1)``, ALLOWED SIGNERS), and
deciding whether at least a threshold of distinct trusted keys signed the manifest.

Pure: bytes, text and the current time come in as arguments. Nothing here opens a file
or reads a clock, so the caller decides where ``manifest.json.sig`` and the trust file
come from and which "now" applies, and tests can pin both.

Not for: reading files (``verify.py`` and the CLI do), making signatures
(``bundler/signing.py``, which builds them with ``signed_data_of_digest`` and ``Signature`` from
here so the format has one definition), certificates (``cert-authority`` lines are
refused), RSA or ECDSA keys (refused in the trust file; their signatures never verify).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

from applier import _sshwire as wire
from applier.errors import HostConfigError, SignatureError
from applier.manifest import SIGNATURE_NAME

logger = logging.getLogger(__name__)

NAMESPACE = "gitops-bundle"
ED25519 = "ssh-ed25519"
SK_ED25519 = "sk-ssh-ed25519@openssh.com"
KEY_TYPES = (ED25519, SK_ED25519)
HASH_ALGORITHMS = frozenset({"sha256", "sha512"})  # PROTOCOL.sshsig allows only these
SIG_VERSION = 1
MAX_SIG_FILE = 64 * 1024
MAX_SIGNATURES = 32
# PROTOCOL.u2f: bit 0 of the authenticator's flags says a person touched the key.
SK_USER_PRESENT = 0x01

_MAGIC = b"SSHSIG"
_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_END = "-----END SSH SIGNATURE-----"
_ARMOR_WIDTH = 70  # what ssh-keygen writes (sshbuf_dtob64 wraps at 70)
_ED25519_KEY_LEN = 32
_ED25519_SIG_LEN = 64

# Every plain key type OpenSSH's sshkey_read() knows. In an allowed_signers line a
# token from this set is the key, not options; the ones we do not verify are refused
# by name instead of being misread as an unknown option.
_OPENSSH_KEY_TYPES = frozenset({
    "ssh-ed25519", "sk-ssh-ed25519@openssh.com", "ssh-rsa", "ssh-dss",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-xmss@openssh.com",
})
_CERT_SUFFIX = "-cert-v01@openssh.com"
_TIME = re.compile(r"([0-9]{8}|[0-9]{12}|[0-9]{14})([Zz]?)")


# -- keys -------------------------------------------------------------------------------


def _parse_key_blob(blob: bytes) -> tuple[str, bytes, str]:
    """(key type, raw Ed25519 key, application) of a wire-encoded public key.

    Key types we do not verify come back with an empty raw key: a signature by such a
    key must still parse, so ``inspect`` can say who made it.
    """
    r = wire.Reader(blob, "key blob")
    key_type = r.text("key type")
    if key_type not in KEY_TYPES:
        return key_type, b"", ""
    raw = r.string("Ed25519 key")
    if len(raw) != _ED25519_KEY_LEN:
        raise wire.WireError(f"key blob: Ed25519 key is {len(raw)} bytes, not 32")
    # PROTOCOL.u2f: sk-ssh-ed25519 appends the FIDO application ("ssh:" usually).
    application = r.text("application") if key_type == SK_ED25519 else ""
    r.end()
    return key_type, raw, application


@dataclass(frozen=True)
class PublicKey:
    """An SSH public key, held as its wire encoding (what signatures and files carry).

    ``key_type`` and ``application`` are checked against ``blob`` on construction, so
    the three never disagree. Only ``KEY_TYPES`` can verify; other types exist here
    only so a signature by one can be parsed and named.
    """

    key_type: str
    blob: bytes
    application: str = ""

    def __post_init__(self) -> None:
        key_type, _raw, application = _parse_key_blob(self.blob)
        if key_type != self.key_type:
            raise ValueError(f"public key blob is {key_type}, not {self.key_type}")
        if application != self.application:
            raise ValueError(f"public key application is {application!r}, "
                             f"not {self.application!r}")

    @classmethod
    def from_blob(cls, blob: bytes) -> PublicKey:
        """The key of a wire blob; raises ``ValueError`` if the blob is malformed."""
        key_type, _raw, application = _parse_key_blob(blob)
        return cls(key_type, blob, application)

    @classmethod
    def ed25519(cls, raw: bytes) -> PublicKey:
        """An ``ssh-ed25519`` key from its 32 raw bytes."""
        return cls.from_blob(wire.string(ED25519) + wire.string(raw))

    @classmethod
    def sk_ed25519(cls, raw: bytes, application: str = "ssh:") -> PublicKey:
        """An ``sk-ssh-ed25519@openssh.com`` key from its 32 raw bytes and application."""
        return cls.from_blob(wire.string(SK_ED25519) + wire.string(raw)
                             + wire.string(application))

    @classmethod
    def from_openssh_line(cls, text: str) -> PublicKey:
        """Parse ``"ssh-ed25519 AAAA... comment"`` (a ``.pub`` file's line).

        Raises ``HostConfigError``: public keys in text come from the host's trust file
        or config; callers add the file and line to the message.
        """
        try:
            return _key_from_fields(text.split())
        except ValueError as e:
            raise HostConfigError(f"invalid public key: {e}") from e

    @property
    def supported(self) -> bool:
        return self.key_type in KEY_TYPES

    @property
    def raw(self) -> bytes:
        """The 32-byte Ed25519 key (empty for key types we do not verify)."""
        return _parse_key_blob(self.blob)[1]

    @property
    def fingerprint(self) -> str:
        """``SHA256:<base64, no padding>`` of the blob, as ``ssh-keygen -l`` prints it."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def to_openssh(self) -> str:
        """``"<type> <base64>"``, the form of a ``.pub`` file or allowed_signers line."""
        return f"{self.key_type} {base64.b64encode(self.blob).decode('ascii')}"


def _key_from_fields(fields: list[str]) -> PublicKey:
    if len(fields) < 2:
        raise ValueError("expected '<key type> <base64>'")
    key_type, b64 = fields[0], fields[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except binascii.Error as e:
        raise ValueError(f"{key_type} key is not valid base64") from e
    key = PublicKey.from_blob(blob)
    if key.key_type != key_type:
        raise ValueError(f"key says {key_type} but its data is {key.key_type}")
    return key


# -- signatures -------------------------------------------------------------------------


def signed_data(namespace: str, hash_algorithm: str, message: bytes) -> bytes:
    """The bytes the SSH key actually signs (PROTOCOL.sshsig section 3).

    The reserved field is signed empty, as OpenSSH both signs and verifies it; what a
    signature blob carries in its own reserved field is ignored (PROTOCOL.sshsig).
    """
    if hash_algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"unsupported hash algorithm {hash_algorithm!r}")
    return signed_data_of_digest(namespace, hash_algorithm,
                                 hashlib.new(hash_algorithm, message).digest())


def signed_data_of_digest(namespace: str, hash_algorithm: str, digest: bytes) -> bytes:
    """``signed_data`` for a message its caller hashed with ``hash_algorithm`` while
    streaming it (a fleet's manifest is written to disk, never held whole)."""
    if hash_algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"unsupported hash algorithm {hash_algorithm!r}")
    size = hashlib.new(hash_algorithm).digest_size
    if len(digest) != size:
        raise ValueError(f"a {hash_algorithm} digest has {size} bytes, not {len(digest)}")
    return (_MAGIC + wire.string(namespace) + wire.string(b"")
            + wire.string(hash_algorithm) + wire.string(digest))


@dataclass(frozen=True)
class Signature:
    """One SSHSIG signature (PROTOCOL.sshsig section 2), parsed but not yet verified."""

    public_key: PublicKey
    namespace: str
    hash_algorithm: str
    signature: bytes  # the key type's own signature blob: string alg, string sig, ...
    reserved: bytes = b""

    @classmethod
    def from_blob(cls, blob: bytes) -> Signature:
        """Parse the binary (de-armored) form; raises ``SignatureError``."""
        try:
            r = wire.Reader(blob, "SSHSIG")
            if r.raw(len(_MAGIC), "magic") != _MAGIC:
                raise wire.WireError("SSHSIG: missing SSHSIG magic")
            version = r.u32("version")
            if version != SIG_VERSION:
                raise wire.WireError(f"SSHSIG: unsupported version {version}")
            key_blob = r.string("public key")
            namespace = r.text("namespace")
            reserved = r.string("reserved")
            hash_algorithm = r.text("hash algorithm")
            signature = r.string("signature")
            r.end()
            key = PublicKey.from_blob(key_blob)
        except ValueError as e:
            raise SignatureError(f"malformed signature: {e}") from e
        return cls(key, namespace, hash_algorithm, signature, reserved)

    def to_blob(self) -> bytes:
        return (_MAGIC + wire.u32(SIG_VERSION) + wire.string(self.public_key.blob)
                + wire.string(self.namespace) + wire.string(self.reserved)
                + wire.string(self.hash_algorithm) + wire.string(self.signature))

    def armor(self) -> bytes:
        """The armored text exactly as ``ssh-keygen -Y sign`` writes it."""
        b64 = base64.b64encode(self.to_blob()).decode("ascii")
        lines = [b64[i : i + _ARMOR_WIDTH] for i in range(0, len(b64), _ARMOR_WIDTH)]
        return "\n".join([_BEGIN, *lines, _END, ""]).encode("ascii")


def ed25519_signature_blob(raw_signature: bytes) -> bytes:
    """The ``ssh-ed25519`` signature blob (RFC 8709) around a 64-byte raw signature."""
    return wire.string(ED25519) + wire.string(raw_signature)


def _armored_blocks(text: str, source: str) -> list[tuple[int, list[str]]]:
    """(first line number, base64 lines) of each BEGIN..END block, strictly."""
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines[0].startswith(_BEGIN):
        raise SignatureError(f"{source}: does not start with {_BEGIN}")
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] | None = None
    start = 0
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip()
        if current is None:
            if stripped == _BEGIN:
                if len(blocks) == MAX_SIGNATURES:
                    raise SignatureError(f"{source}: more than {MAX_SIGNATURES} signatures")
                current, start = [], lineno
            elif stripped:
                raise SignatureError(f"{source}:{lineno}: unexpected text outside a "
                                     "signature block")
        elif stripped == _END:
            blocks.append((start, current))
            current = None
        elif stripped == _BEGIN:
            raise SignatureError(f"{source}:{lineno}: new signature before {_END}")
        else:
            current.append(stripped)
    if current is not None:
        raise SignatureError(f"{source}:{start}: truncated signature: no {_END}")
    return blocks


def parse_signatures(data: bytes, source: str = SIGNATURE_NAME) -> list[Signature]:
    """Every armored signature in a ``.sig`` file, in order.

    The file holds one or more blocks back to back (co-signing appends one per
    signer); blank lines between them are allowed, anything else is not, so what we
    verify is all that the file says.
    """
    if len(data) > MAX_SIG_FILE:
        raise SignatureError(f"{source}: {len(data)} bytes, more than {MAX_SIG_FILE}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise SignatureError(f"{source}: not ASCII text (byte {e.start})") from e
    signatures = []
    for start, body in _armored_blocks(text, source):
        try:
            blob = base64.b64decode("".join(body), validate=True)
        except binascii.Error as e:
            raise SignatureError(f"{source}:{start}: signature is not valid base64") from e
        try:
            signatures.append(Signature.from_blob(blob))
        except SignatureError as e:
            raise SignatureError(f"{source}:{start}: {e}") from e
    return signatures


def signature_fingerprints(sig_data: bytes) -> list[str]:
    """Who signed, without judging trust or validity (for ``inspect``)."""
    return [s.public_key.fingerprint for s in parse_signatures(sig_data)]


def verify_one(message: bytes, sig: Signature, namespace: str = NAMESPACE) -> PublicKey:
    """Check one signature over ``message``; return its key or raise ``SignatureError``.

    This says only that the key in the signature signed; whether that key is trusted
    is ``AllowedSigners``'s question.
    """
    key = sig.public_key
    where = f"signed by {key.fingerprint}"
    # The namespace is compared before anything else so that a signature made for
    # another purpose (git commits, files) is never accepted as a bundle signature.
    if sig.namespace != namespace:
        raise SignatureError(f"{where}: namespace {sig.namespace!r} is not {namespace!r}")
    if sig.hash_algorithm not in HASH_ALGORITHMS:
        raise SignatureError(f"{where}: unsupported hash algorithm {sig.hash_algorithm!r}")
    if not key.supported:
        raise SignatureError(f"{where}: unsupported key type {key.key_type}")
    data = signed_data(namespace, sig.hash_algorithm, message)
    try:
        if key.key_type == ED25519:
            _verify_ed25519(key, sig.signature, data)
        else:
            _verify_sk_ed25519(key, sig.signature, data)
    except wire.WireError as e:
        raise SignatureError(f"{where}: malformed {e}") from e
    return key


def _check_ed25519(raw_key: bytes, raw_sig: bytes, signed: bytes) -> None:
    if len(raw_sig) != _ED25519_SIG_LEN:
        raise wire.WireError(f"signature blob: Ed25519 signature is {len(raw_sig)} bytes")
    # Imported here, not at the top: loading cryptography's bindings is a large part of
    # the CLI's start-up, and status, history and a drift check never verify a signature.
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PublicKey,
    )

    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(raw_sig, signed)
    except InvalidSignature as e:
        raise SignatureError("bad signature") from e


def _verify_ed25519(key: PublicKey, blob: bytes, data: bytes) -> None:
    r = wire.Reader(blob, "signature blob")
    alg = r.text("algorithm")
    raw_sig = r.string("signature")
    r.end()
    if alg != ED25519:
        raise SignatureError(f"signed by {key.fingerprint}: {alg} signature "
                             f"from a {ED25519} key")
    try:
        _check_ed25519(key.raw, raw_sig, data)
    except SignatureError as e:
        raise SignatureError(f"signed by {key.fingerprint}: {e}") from e


def _verify_sk_ed25519(key: PublicKey, blob: bytes, data: bytes) -> None:
    # PROTOCOL.u2f: the wire signature is string alg, string sig, byte flags, uint32
    # counter; the authenticator signed sha256(application) || flags || counter ||
    # sha256(data) (no extensions are defined for SSH).
    r = wire.Reader(blob, "signature blob")
    alg = r.text("algorithm")
    raw_sig = r.string("signature")
    flags = r.u8("flags")
    counter = r.u32("counter")
    r.end()
    where = f"signed by {key.fingerprint}"
    if alg != SK_ED25519:
        raise SignatureError(f"{where}: {alg} signature from a {SK_ED25519} key")
    signed = (hashlib.sha256(key.application.encode("ascii")).digest() + bytes([flags])
              + wire.u32(counter) + hashlib.sha256(data).digest())
    try:
        _check_ed25519(key.raw, raw_sig, signed)
    except SignatureError as e:
        raise SignatureError(f"{where}: {e}") from e
    # Checked after the signature so the message never reports flags that nobody
    # signed. ssh-keygen -Y verify does not insist on a touch; we do, because a FIDO
    # key signs a release to show a person approved it.
    if not flags & SK_USER_PRESENT:
        raise SignatureError(f"{where}: the security key did not confirm user presence "
                             f"(flags 0x{flags:02x})")


# -- allowed_signers -----------------------------------------------------------------------


def _match_pattern(name: str, pattern: str) -> bool:
    """OpenSSH match_pattern(): ``*`` and ``?`` wildcards, everything else literal."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, flags=re.DOTALL) is not None


def _match_pattern_list(name: str, patterns: tuple[str, ...]) -> bool:
    """OpenSSH match_pattern_list(): any positive match and no ``!negated`` match."""
    positive = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _match_pattern(name, pattern[1:]):
                return False
        elif _match_pattern(name, pattern):
            positive = True
    return positive


def _utc(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class AllowedSigner:
    """One line of an allowed_signers file: who (patterns), which key, for what, when."""

    principals: tuple[str, ...]
    key: PublicKey
    namespaces: tuple[str, ...] | None = None
    valid_after: int | None = None
    valid_before: int | None = None

    def __post_init__(self) -> None:
        if not self.principals or any(not p or p.isspace() for p in self.principals):
            raise ValueError("empty principal")
        if not self.key.supported:
            raise ValueError(f"key type {self.key.key_type} is not supported "
                             f"(only {', '.join(KEY_TYPES)})")
        if self.namespaces is not None and (
            not self.namespaces or any(not n for n in self.namespaces)
        ):
            raise ValueError("empty namespace in namespaces")
        if (self.valid_after is not None and self.valid_before is not None
                and self.valid_before <= self.valid_after):
            raise ValueError("valid-before is not after valid-after")

    def refusal(self, namespace: str, now: int) -> str | None:
        """Why this entry does not vouch for its key here and now, or None if it does."""
        # Same comparisons as OpenSSH check_allowed_keys_line(): both ends inclusive.
        if self.namespaces is not None and not _match_pattern_list(namespace,
                                                                   self.namespaces):
            return f"not allowed for namespace {namespace!r}"
        if self.valid_after is not None and now < self.valid_after:
            return f"not valid before {_utc(self.valid_after)}"
        if self.valid_before is not None and now > self.valid_before:
            return f"expired at {_utc(self.valid_before)}"
        return None


class _LineError(ValueError):
    """What is wrong with one allowed_signers line (the caller adds where)."""


def _split_token(text: str) -> tuple[str, str]:
    """The first whitespace-delimited token (may be "quoted") and the rest."""
    if text.startswith('"'):
        end = text.find('"', 1)
        if end < 0:
            raise _LineError("unterminated quote in principals")
        return text[1:end], text[end + 1 :]
    m = re.match(r"[^ \t]*", text)
    token = m.group(0) if m else ""
    return token, text[len(token) :]


def _split_options(text: str) -> tuple[str, str]:
    """The options field (spaces allowed only inside quotes) and the rest."""
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c in " \t" and not quoted:
            return text[:i], text[i:]
        if c == "\\" and quoted and text[i + 1 : i + 2] == '"':
            i += 1
        elif c == '"':
            quoted = not quoted
        i += 1
    if quoted:
        raise _LineError("unterminated quote in options")
    return text, ""


def _parse_time(value: str, tz: tzinfo | None) -> int:
    """OpenSSH parse_absolute_time(): YYYYMMDD[HHMM[SS]][Z]; no Z means local time."""
    m = _TIME.fullmatch(value)
    if m is None:
        raise _LineError(f"invalid time {value!r} (want YYYYMMDD[HHMM[SS]][Z])")
    digits, zulu = m.groups()
    # Missing HHMM / SS mean 00, as strptime leaves them.
    hour, minute, second = (int(digits[i : i + 2] or "0") for i in (8, 10, 12))
    try:
        when = datetime(int(digits[:4]), int(digits[4:6]), int(digits[6:8]),
                        hour, minute, second)
    except ValueError as e:
        raise _LineError(f"invalid time {value!r}: {e}") from e
    if zulu:
        when = when.replace(tzinfo=UTC)
    elif tz is not None:
        when = when.replace(tzinfo=tz)
    # A naive datetime's timestamp() uses the system zone, as ssh-keygen's mktime().
    ts = int(when.timestamp())
    if ts <= 0:
        raise _LineError(f"invalid time {value!r}: not after 1970")
    return ts


def _dequote(opts: str, pos: int) -> tuple[str, int]:
    """OpenSSH opt_dequote(): a "double-quoted" value where \\" stands for a quote."""
    if opts[pos : pos + 1] != '"':
        raise _LineError("option value must be in double quotes")
    out = []
    i = pos + 1
    while i < len(opts) and opts[i] != '"':
        if opts[i] == "\\" and opts[i + 1 : i + 2] == '"':
            i += 1
        out.append(opts[i])
        i += 1
    if i >= len(opts):
        raise _LineError("missing end quote in option value")
    return "".join(out), i + 1


@dataclass
class _Options:
    """The options field of one allowed_signers line."""

    namespaces: tuple[str, ...] | None = None
    valid_after: int | None = None
    valid_before: int | None = None


def _parse_options(opts: str, tz: tzinfo | None) -> _Options:
    """OpenSSH sshsigopt_parse(): comma-separated, keywords case-insensitive."""
    out = _Options()
    seen: set[str] = set()
    pos = 0
    while pos < len(opts):
        rest = opts[pos:].lower()
        if rest.startswith("cert-authority") and rest[14:15] in ("", ","):
            raise _LineError("cert-authority is not supported (certificates are not "
                             "accepted; list each signer's own key)")
        name = next((n for n in ("namespaces", "valid-after", "valid-before")
                     if rest.startswith(n + "=")), None)
        if name is None:
            raise _LineError(f"unknown option {opts[pos:].split(',', maxsplit=1)[0]!r}")
        if name in seen:
            raise _LineError(f"multiple {name!r} options")
        seen.add(name)
        value, pos = _dequote(opts, pos + len(name) + 1)
        if name == "namespaces":
            out.namespaces = tuple(value.split(","))
            if any(not n for n in out.namespaces):
                raise _LineError(f"empty namespace in namespaces={value!r}")
        elif name == "valid-after":
            out.valid_after = _parse_time(value, tz)
        else:
            out.valid_before = _parse_time(value, tz)
        if pos == len(opts):
            break
        if opts[pos] != ",":
            raise _LineError(f"expected ',' after the {name} option")
        pos += 1
        if pos == len(opts):
            raise _LineError("options end with ','")
    return out


def _is_key_type(token: str) -> bool:
    return token in _OPENSSH_KEY_TYPES or token.endswith(_CERT_SUFFIX)


def _parse_line(line: str, tz: tzinfo | None) -> AllowedSigner:
    try:
        return _parse_fields(line, tz)
    except _LineError as e:
        mistake = _known_mistake(line)
        if mistake is None:
            raise
        raise _LineError(mistake) from e


def _known_mistake(line: str) -> str | None:
    """What a line that did not parse most likely is: a file given in the wrong place.

    Only asked after the line failed, so any line ssh-keygen accepts still parses.
    """
    if line.startswith("-----BEGIN ") and "PRIVATE KEY" in line:
        # Named, never quoted: the lines after this one are the secret.
        return ("this is a private key, not a list of trusted public keys (each line "
                "'PRINCIPALS ssh-ed25519 AAAA...'); keep private keys off the hosts")
    first = line.split(None, 1)[0]
    if _is_key_type(first):
        return (f"starts with the key type {first}: a public key (.pub) line needs the "
                f"signer's name in front ('ops@example {first} AAAA...')")
    return None


def _parse_fields(line: str, tz: tzinfo | None) -> AllowedSigner:
    principals_field, rest = _split_token(line)
    rest = rest.lstrip(" \t")
    if not principals_field or not rest:
        raise _LineError("expected 'principals [options] key-type base64-key'")
    principals = tuple(principals_field.split(","))
    if any(not p for p in principals):
        raise _LineError(f"empty principal in {principals_field!r}")
    first = rest.split(None, 1)[0]
    options = _Options()
    if not _is_key_type(first):
        opts, rest = _split_options(rest)
        options = _parse_options(opts, tz)
        rest = rest.lstrip(" \t")
        if not rest:
            raise _LineError("missing key after the options")
    fields = rest.split()
    if fields[0].endswith(_CERT_SUFFIX):
        raise _LineError(f"key type {fields[0]} is a certificate; certificates are "
                         "not supported")
    if fields[0] not in KEY_TYPES:
        raise _LineError(f"key type {fields[0]} is not supported "
                         f"(only {', '.join(KEY_TYPES)})")
    key = _key_from_fields(fields)
    return AllowedSigner(principals, key, options.namespaces, options.valid_after,
                         options.valid_before)


@dataclass(frozen=True)
class AllowedSigners:
    """The keys a host trusts, parsed from an OpenSSH ``allowed_signers`` file."""

    entries: tuple[AllowedSigner, ...]

    @classmethod
    def from_text(cls, text: str, source: str, *, tz: tzinfo | None = None) -> AllowedSigners:
        """Parse the file's text; ``source`` names it in errors (``source:line: what``).

        Times without ``Z`` are in ``tz``, by default the system's zone (as in
        ssh-keygen). Any line we cannot honour exactly is an error rather than skipped:
        a trust file that silently means less than it says is worse than none.
        """
        entries = []
        for lineno, raw_line in enumerate(text.split("\n"), start=1):
            line = raw_line.strip(" \t\r")
            if not line or line.startswith("#"):
                continue
            try:
                entries.append(_parse_line(line, tz))
            except ValueError as e:
                raise HostConfigError(f"{source}:{lineno}: {e}") from e
        if not entries:
            raise HostConfigError(f"{source}: no signer keys")
        return cls(tuple(entries))

    def signers_for(self, key: PublicKey, namespace: str, now: int) -> list[AllowedSigner]:
        """The entries that vouch for ``key`` in ``namespace`` at time ``now``."""
        return [e for e in self.entries
                if e.key == key and e.refusal(namespace, now) is None]

    def refusal(self, key: PublicKey, namespace: str, now: int) -> str:
        """Why no entry vouches for ``key``, one line, naming its fingerprint."""
        reasons = [r for e in self.entries if e.key == key
                   for r in [e.refusal(namespace, now)] if r is not None]
        if not reasons:
            return f"signed by {key.fingerprint} which is not in allowed_signers"
        return f"signed by {key.fingerprint} which allowed_signers lists but " + (
            " and ".join(dict.fromkeys(reasons)))


# -- the manifest's signatures ----------------------------------------------------------


@dataclass(frozen=True)
class VerifiedSigner:
    """A trusted key whose valid signature over the manifest was found."""

    principals: tuple[str, ...]
    fingerprint: str
    key: PublicKey


def verify_manifest_signatures(
    message: bytes,
    sig_data: bytes,
    trusted: AllowedSigners,
    now: int,
    *,
    threshold: int = 1,
    namespace: str = NAMESPACE,
) -> tuple[VerifiedSigner, ...]:
    """The distinct trusted keys that validly signed ``message``; at least ``threshold``.

    Signatures by keys the host does not trust are ignored (a bundle may carry
    signatures for other fleets), but they are named in the error when too few
    trusted keys signed. One key signing twice counts once.
    """
    if threshold < 1:
        raise HostConfigError(f"signature threshold must be at least 1, not {threshold}")
    signatures = parse_signatures(sig_data)
    verified: dict[bytes, VerifiedSigner] = {}
    problems: dict[str, None] = {}  # ordered set: one line per distinct problem
    for sig in signatures:
        key = sig.public_key
        if key.blob in verified:
            continue
        # Trust first: an untrusted signature costs no cryptography and, whatever it
        # contains, is reported only as untrusted.
        entries = trusted.signers_for(key, namespace, now)
        if not entries:
            problems[trusted.refusal(key, namespace, now)] = None
            continue
        try:
            verify_one(message, sig, namespace)
        except SignatureError as e:
            problems[str(e)] = None
            continue
        principals = tuple(dict.fromkeys(p for e in entries for p in e.principals))
        verified[key.blob] = VerifiedSigner(principals, key.fingerprint, key)
        logger.debug("valid signature by %s (%s)", key.fingerprint, ",".join(principals))
    if len(verified) < threshold:
        if problems:
            detail = "; ".join(problems)
        else:
            distinct = len({s.public_key.blob for s in signatures})
            detail = (f"the file holds {len(signatures)} signature(s) by {distinct} "
                      "distinct key(s)")
        raise SignatureError(f"{SIGNATURE_NAME}: {len(verified)} of {threshold} required "
                             f"trusted signatures ({detail})")
    return tuple(verified.values())
