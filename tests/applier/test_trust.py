"""Threshold signatures, co-signing, key rotation and revocation, end to end.

Real ``ssh-keygen`` keys throughout; bundles are refused or applied through the real
``gitops-apply`` CLI, co-signed through the real ``gitops-bundle sign``, and one
signature is made by ``ssh-keygen -Y sign`` itself and appended by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from hostile import Outcome, frozen_host, run_apply

from applier import trust_store
from applier.apply import Host, init_host
from applier.config import HostConfig
from applier.errors import ExitCode, HostIOError, SignatureError
from applier.manifest import TrustUpdate
from applier.paths import HostLayout
from applier.watch import Watcher
from bundler import cli as bundler_cli

from factory import (
    CREATED,
    BundleSpec,
    KeyPair,
    make_key,
    sign_bytes,
    snapshot,
    write_allowed_signers,
)

NOW = CREATED + 3600
REPO = Path(__file__).resolve().parents[2]
MOTD = "/etc/motd"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("trust-keys")
    return {name: make_key(d, name) for name in ("alice", "bob", "carol", "dave")}


def spec(seq: int, motd: bytes | None = None) -> BundleSpec:
    return BundleSpec({"frodo": {MOTD: motd or f"motd {seq}\n".encode()}}, sequence=seq,
                      commit=f"{seq:040x}")


def signers_text(*keys: KeyPair) -> str:
    return "".join(k.signers_line() for k in keys)


def write_bundle(out: Path, s: BundleSpec, *signers: KeyPair,
                 trust: TrustUpdate | None = None) -> Path:
    """A bundle of ``s``, optionally carrying a trust update, signed by each of ``signers``."""
    manifest = dataclasses.replace(s.manifest(), trust=trust).to_bytes()
    sig = b"".join(sign_bytes(manifest, k) for k in signers)
    return s.write(out, manifest_bytes=manifest, signature=sig)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    frozen_host(monkeypatch, NOW)
    return tmp_path / "frodo"


def init(root: Path, tmp_path: Path, *trusted: KeyPair, threshold: int = 1) -> None:
    init_host(root, "frodo", write_allowed_signers(tmp_path / "trusted", *trusted),
              threshold=threshold)


def refused(capsys: pytest.CaptureFixture[str], root: Path, bundle: Path, code: int,
            match: str) -> Outcome:
    before = snapshot(root)
    out = run_apply(capsys, root, bundle)
    assert out.code == code, out.lines
    assert len(out.lines) == 1, out.lines
    assert match in out.line, out.line
    assert snapshot(root) == before
    return out


def applied(capsys: pytest.CaptureFixture[str], root: Path, bundle: Path) -> None:
    out = run_apply(capsys, root, bundle)
    assert out.code == 0, out.lines


def motd(root: Path) -> bytes:
    return (root / "etc/motd").read_bytes()


def config(root: Path) -> dict[str, object]:
    data = yaml.safe_load((root / "etc/gitops-apply/config.yaml").read_text())
    assert isinstance(data, dict)
    return data


def trust_events(root: Path) -> list[dict[str, object]]:
    return [r for r in Host(root).history() if r["event"] == "trust"]


# -- threshold and co-signing -----------------------------------------------------------


def test_two_of_three_needs_two_distinct_keys(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob, carol = keys["alice"], keys["bob"], keys["carol"]
    init(host, tmp_path, alice, bob, carol, threshold=2)
    one = write_bundle(tmp_path / "one.tar", spec(1), alice)
    refused(capsys, host, one, ExitCode.VERIFICATION, "1 of 2 required trusted signatures")
    twice = write_bundle(tmp_path / "twice.tar", spec(1), alice, alice)
    refused(capsys, host, twice, ExitCode.VERIFICATION, "1 of 2 required trusted signatures")
    # An untrusted co-signer does not make up the difference.
    outsider = write_bundle(tmp_path / "outsider.tar", spec(1), alice, keys["dave"])
    refused(capsys, host, outsider, ExitCode.VERIFICATION, "not in allowed_signers")
    applied(capsys, host, write_bundle(tmp_path / "two.tar", spec(1), alice, carol))
    assert motd(host) == b"motd 1\n"


def test_cosign_with_gitops_bundle_sign(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    """A second person co-signs on another workstation; the manifest is untouched."""
    alice, bob, carol = keys["alice"], keys["bob"], keys["carol"]
    init(host, tmp_path, alice, bob, carol, threshold=2)
    first = write_bundle(tmp_path / "b.tar.gz", spec(1), alice)
    cosigned = tmp_path / "cosigned.tar.gz"
    capsys.readouterr()
    code = bundler_cli.main(["sign", str(first), "--key", str(bob.private), "-o",
                             str(cosigned)])
    assert code == 0, capsys.readouterr().err
    # Signing twice with the same key is refused by the tool, not silently counted.
    again = bundler_cli.main(["sign", str(cosigned), "--key", str(bob.private), "-o",
                              str(tmp_path / "again.tar.gz")])
    assert again != 0
    assert "already signed" in capsys.readouterr().err
    applied(capsys, host, cosigned)
    retained = next((host / "var/lib/gitops-apply/bundles").iterdir())
    assert (retained / "manifest.json").read_bytes() == spec(1).manifest().to_bytes()
    assert (retained / "manifest.json.sig").read_bytes().count(b"BEGIN SSH SIGNATURE") == 2


def test_cosign_refuses_a_tampered_bundle(tmp_path: Path, keys: dict[str, KeyPair],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A co-signer never endorses bytes that the first signature does not cover."""
    alice, bob = keys["alice"], keys["bob"]
    good = spec(1).manifest().to_bytes()
    tampered = spec(1, b"owned\n").write(tmp_path / "t.tar", manifest_bytes=spec(
        1, b"owned\n").manifest().to_bytes(), signature=sign_bytes(good, alice))
    capsys.readouterr()
    code = bundler_cli.main(["sign", str(tampered), "--key", str(bob.private), "-o",
                             str(tmp_path / "out.tar")])
    assert code == ExitCode.VERIFICATION
    assert "bad signature" in capsys.readouterr().err
    assert not (tmp_path / "out.tar").exists()


def test_signature_made_by_ssh_keygen_and_appended_by_hand_counts(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob, carol = keys["alice"], keys["bob"], keys["carol"]
    init(host, tmp_path, alice, bob, carol, threshold=2)
    s = spec(1)
    manifest = s.manifest().to_bytes()
    (tmp_path / "manifest.json").write_bytes(manifest)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", "gitops-bundle", "-f",
                    str(carol.private), str(tmp_path / "manifest.json")], check=True,
                   capture_output=True)
    by_hand = (tmp_path / "manifest.json.sig").read_bytes()
    bundle = s.write(tmp_path / "b.tar", manifest_bytes=manifest,
                     signature=sign_bytes(manifest, alice) + by_hand)
    applied(capsys, host, bundle)
    signers = Host(host).history()[-1]["signers"]
    assert isinstance(signers, list)
    assert sorted(str(x).split(" ")[0] for x in signers) == ["alice", "carol"]


# -- rotation ---------------------------------------------------------------------------


def test_rotation_needs_old_and_new_keys_then_old_key_is_revoked(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = keys["alice"], keys["bob"]
    init(host, tmp_path, alice)
    applied(capsys, host, write_bundle(tmp_path / "b1.tar", spec(1), alice))
    to_bob = TrustUpdate(signers_text(bob), threshold=1)
    # Old keys alone cannot move trust; new keys alone are not trusted yet.
    refused(capsys, host, write_bundle(tmp_path / "a.tar", spec(2), alice, trust=to_bob),
            ExitCode.VERIFICATION, "trust update is not signed by a threshold of the new keys")
    refused(capsys, host, write_bundle(tmp_path / "b.tar", spec(2), bob, trust=to_bob),
            ExitCode.VERIFICATION, "not in allowed_signers")
    # --dry-run shows the plan and adopts nothing.
    both = write_bundle(tmp_path / "ab.tar", spec(2), alice, bob, trust=to_bob)
    before = snapshot(host)
    assert run_apply(capsys, host, both, "--dry-run").code == 0
    assert snapshot(host) == before
    applied(capsys, host, both)
    cfg = config(host)
    schema = json.loads((REPO / "schemas/config.schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["allowed_signers"] == "allowed_signers.2"
    assert cfg["trust_sequence"] == 2
    assert (host / "etc/gitops-apply/allowed_signers.2").read_text() == signers_text(bob)
    assert not (host / "etc/gitops-apply/allowed_signers").exists()
    # The host config's parse cache follows the rewritten config.yaml, and only it.
    layout = HostLayout(host)
    cached, digest = HostConfig.load_cached(layout.config_file, layout.config_cache)
    assert (cached.trust_sequence, digest) == (2, None)
    [event] = trust_events(host)
    assert event["bundle_id"] == spec(2).manifest().bundle_id
    assert event["revoked"]
    assert event["added"]
    # Alice is revoked: her bundles are refused, bob's apply.
    refused(capsys, host, write_bundle(tmp_path / "a3.tar", spec(3), alice),
            ExitCode.VERIFICATION, "not in allowed_signers")
    applied(capsys, host, write_bundle(tmp_path / "b3.tar", spec(3), bob))
    assert motd(host) == b"motd 3\n"


def test_revoking_a_lost_key_from_a_two_of_three_host(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob, carol, dave = keys["alice"], keys["bob"], keys["carol"], keys["dave"]
    init(host, tmp_path, alice, bob, carol, threshold=2)
    applied(capsys, host, write_bundle(tmp_path / "b1.tar", spec(1), alice, bob))
    # carol's key is lost: alice and bob replace it with dave's.
    update = TrustUpdate(signers_text(alice, bob, dave), threshold=2)
    refused(capsys, host, write_bundle(tmp_path / "x.tar", spec(2), alice, carol,
                                       trust=update),
            ExitCode.VERIFICATION, "1 of 2 required trusted signatures")
    applied(capsys, host, write_bundle(tmp_path / "b2.tar", spec(2), alice, bob, trust=update))
    # Whoever holds carol's key now cannot get a bundle through with one accomplice key.
    refused(capsys, host, write_bundle(tmp_path / "c3.tar", spec(3), alice, carol),
            ExitCode.VERIFICATION, "1 of 2 required trusted signatures")
    applied(capsys, host, write_bundle(tmp_path / "d3.tar", spec(3), bob, dave))
    [event] = trust_events(host)
    assert len(event["revoked"]) == 1  # type: ignore[arg-type]


def test_reset_sequence_recovers_from_a_fast_forward_by_a_leaked_key(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob, dave = keys["alice"], keys["bob"], keys["dave"]
    init(host, tmp_path, alice, bob)
    applied(capsys, host, write_bundle(tmp_path / "b1.tar", spec(1), bob))
    # The thief of alice's key pushes the host far ahead: every real bundle is now a replay.
    applied(capsys, host, write_bundle(tmp_path / "evil.tar", spec(10**12, b"owned\n"),
                                       alice))
    refused(capsys, host, write_bundle(tmp_path / "b2.tar", spec(2), bob),
            ExitCode.POLICY, "not above 1000000000000")
    # A plain bundle can never lower the mark, even if it asks to via a no-op trust field.
    same = TrustUpdate(signers_text(alice, bob), threshold=1, reset_sequence=True)
    refused(capsys, host, write_bundle(tmp_path / "same.tar", spec(2), bob, trust=same),
            ExitCode.POLICY, "not above 1000000000000")
    # The rotation revokes alice and resets the mark.
    rotate = TrustUpdate(signers_text(bob, dave), threshold=1, reset_sequence=True)
    applied(capsys, host, write_bundle(tmp_path / "rot.tar", spec(3), bob, dave, trust=rotate))
    assert motd(host) == b"motd 3\n"
    assert Host(host).status()["highest_sequence"] == 3
    applied(capsys, host, write_bundle(tmp_path / "b4.tar", spec(4), bob))
    refused(capsys, host, write_bundle(tmp_path / "evil2.tar", spec(10**13), alice),
            ExitCode.VERIFICATION, "not in allowed_signers")


def test_an_old_rotation_cannot_be_replayed_to_re_trust_a_revoked_key(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = keys["alice"], keys["bob"]
    init(host, tmp_path, alice)
    add_bob = TrustUpdate(signers_text(alice, bob), threshold=1, reset_sequence=True)
    old_rotation = write_bundle(tmp_path / "r2.tar", spec(2), alice, bob, trust=add_bob)
    applied(capsys, host, old_rotation)
    drop_bob = TrustUpdate(signers_text(alice), threshold=1)
    applied(capsys, host, write_bundle(tmp_path / "r3.tar", spec(3), alice, trust=drop_bob))
    # alice signed the old rotation and is still trusted, and the old rotation's new set
    # contains her too: only the rotation sequence stops it re-trusting bob (and resetting).
    refused(capsys, host, old_rotation, ExitCode.POLICY,
            "trust update at sequence 2, not above 3 of the last adopted rotation")
    assert len(trust_events(host)) == 2


def test_recarrying_the_adopted_trust_is_an_ordinary_bundle(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair],
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = keys["alice"], keys["bob"]
    init(host, tmp_path, alice)
    update = TrustUpdate(signers_text(alice, bob), threshold=1, reset_sequence=True)
    applied(capsys, host, write_bundle(tmp_path / "r5.tar", spec(5), alice, bob, trust=update))
    applied(capsys, host, write_bundle(tmp_path / "r7.tar", spec(7), bob, trust=update))
    # Same trust: no second adoption, and no reset for the older bundle.
    refused(capsys, host, write_bundle(tmp_path / "r6.tar", spec(6), bob, trust=update),
            ExitCode.POLICY, "sequence 6, not above 7 already applied")
    assert len(trust_events(host)) == 1


@pytest.mark.parametrize(("update_text", "threshold", "match"), [
    ("not a signers file\n", 1, "trust update:1: unknown option"),
    ("", 1, "no signer keys"),
    (None, 2, "1 distinct key(s) cannot meet its threshold of 2"),
], ids=["garbage", "empty", "threshold-above-keys"])
def test_invalid_trust_update_is_refused(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair], capsys: pytest.CaptureFixture[str],
        update_text: str | None, threshold: int, match: str) -> None:
    alice = keys["alice"]
    init(host, tmp_path, alice)
    text = signers_text(alice) if update_text is None else update_text
    bundle = write_bundle(tmp_path / "r.tar", spec(1), alice,
                          trust=TrustUpdate(text, threshold=threshold))
    refused(capsys, host, bundle, ExitCode.VERIFICATION, match)
    capsys.readouterr()
    from applier import cli  # noqa: PLC0415 - frozen_host patched this module's Host

    assert cli.main(["--root", str(host), "verify", str(bundle)]) == ExitCode.VERIFICATION


def test_audit_log_records_the_rotation(host: Path, tmp_path: Path, keys: dict[str, KeyPair],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = keys["alice"], keys["bob"]
    init(host, tmp_path, alice)
    update = TrustUpdate(signers_text(bob), threshold=1)
    applied(capsys, host, write_bundle(tmp_path / "r.tar", spec(1), alice, bob, trust=update))
    line = (host / "var/lib/gitops-apply/audit.log").read_text().splitlines()[-1]
    record = json.loads(line)
    assert record["event"] == "trust"
    assert record["threshold"] == 1
    assert len(record["signed_by_old"]) == 1
    assert len(record["signed_by_new"]) == 1


def _gitops_apply(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "applier.cli", "--root", str(root), *args],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, **env})


@pytest.mark.parametrize("then", ["status", "watch"])
def test_a_crash_between_commit_and_adoption_never_loses_a_revocation(
        tmp_path: Path, keys: dict[str, KeyPair], then: str) -> None:
    """Killed right after the rotation bundle's commit point, before the new trust was
    written: the next command (a status, or the watcher, which skips a bundle already
    applied) adopts it, and the revoked key's bundles are refused from then on."""
    alice, bob = keys["alice"], keys["bob"]
    root = tmp_path / "frodo"
    init(root, tmp_path, alice)
    assert _gitops_apply(root, "apply", str(write_bundle(tmp_path / "b1.tar", spec(1),
                                                         alice))).returncode == 0
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rotation = write_bundle(inbox / "b2.tar", spec(2), alice, bob,
                            trust=TrustUpdate(signers_text(bob), threshold=1))
    probe = tmp_path / "probe"
    shutil.copytree(root, probe, symlinks=True)
    log = tmp_path / "faults.log"
    assert _gitops_apply(probe, "apply", str(rotation),
                         GITOPS_FAULT_LOG=str(log)).returncode == 0
    at = next(int(line.split()[0]) for line in log.read_text().splitlines()
              if line.endswith(" current:renamed"))
    killed = _gitops_apply(root, "apply", str(rotation), GITOPS_FAULT_AT=str(at))
    assert killed.returncode == -signal.SIGKILL
    assert config(root)["allowed_signers"] == "allowed_signers"  # not adopted yet
    if then == "status":
        assert _gitops_apply(root, "status").returncode == 0
    else:
        done = _gitops_apply(root, "watch", "--once", "--settle", "0", str(inbox))
        assert done.returncode == 0, done.stderr
        assert "already applied" in done.stdout
    assert config(root)["allowed_signers"] == "allowed_signers.2"
    assert [e["bundle_id"] for e in trust_events(root)] == [spec(2).manifest().bundle_id]
    revoked = _gitops_apply(root, "apply", str(write_bundle(tmp_path / "a3.tar", spec(3),
                                                            alice)))
    assert revoked.returncode == ExitCode.VERIFICATION, revoked.stderr
    assert motd(root) == b"motd 2\n"


def _trusting_alice_with_an_inbox(root: Path, tmp_path: Path, alice: KeyPair) -> Path:
    """A host that trusts alice and applied her bundle 1; the empty inbox of its stick."""
    init(root, tmp_path, alice)
    Host(root).apply(write_bundle(tmp_path / "b1.tar", spec(1), alice))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return inbox


def _watch_once(root: Path, inbox: Path) -> dict[str, str]:
    """``watch --once`` over the inbox: each bundle's name and what became of it."""
    return {o.path.name: o.result for o in
            Watcher(Host(root), [inbox], settle=0.0).run(0.05, once=True)}


@pytest.mark.parametrize("newer_signed_by", ["old-and-new", "new-only"])
def test_a_rotation_on_the_stick_with_a_newer_bundle_is_adopted_first(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair], newer_signed_by: str) -> None:
    """The stick holds the rotation (sequence 2) and a newer bundle (3). Newest first
    would skip the rotation as superseded (a co-signed 3 applies under the old trust:
    the revocation is lost), or reject 3 before the rotation made its signer trusted."""
    alice, bob = keys["alice"], keys["bob"]
    inbox = _trusting_alice_with_an_inbox(host, tmp_path, alice)
    write_bundle(inbox / "b2.tar", spec(2), alice, bob,
                 trust=TrustUpdate(signers_text(bob), threshold=1))
    signers = (alice, bob) if newer_signed_by == "old-and-new" else (bob,)
    write_bundle(inbox / "b3.tar", spec(3), *signers)
    outcomes = _watch_once(host, inbox)
    assert outcomes == {"b2.tar": "applied", "b3.tar": "applied"}
    assert config(host)["allowed_signers"] == "allowed_signers.2"
    assert motd(host) == b"motd 3\n"
    (inbox / "a4.tar").write_bytes(write_bundle(tmp_path / "a4.tar", spec(4), alice)
                                   .read_bytes())
    [o] = Watcher(Host(host), [inbox], settle=0.0).run(0.05, once=True)
    assert o.result == "rejected"
    assert motd(host) == b"motd 3\n"


def test_an_unfinished_adoption_is_finished_after_the_old_key_expired(
        tmp_path: Path, keys: dict[str, KeyPair], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotations are made because an old key is about to expire. The adoption is
    interrupted (here: the disk is full), and the host comes back after the old key's
    valid-before: the retained bundle is checked as of when it was applied, the new
    trust adopted, and no command is refused for it."""
    alice, bob = keys["alice"], keys["bob"]
    root = tmp_path / "frodo"
    expiry = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(NOW + 2 * 86400))
    trusted = tmp_path / "trusted"
    trusted.write_text(f'alice valid-before="{expiry}" {alice.public_line}\n')
    init_host(root, "frodo", trusted)
    clock = [float(NOW)]
    Host(root, clock=lambda: clock[0]).apply(write_bundle(tmp_path / "b1.tar", spec(1), alice))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise HostIOError("cannot write allowed_signers.2: no space left on device")

    adopt = trust_store.adopt
    monkeypatch.setattr(trust_store, "adopt", disk_full)
    with pytest.raises(HostIOError):
        Host(root, clock=lambda: clock[0]).apply(write_bundle(
            tmp_path / "b2.tar", spec(2), alice, bob,
            trust=TrustUpdate(signers_text(bob), threshold=1)))
    monkeypatch.setattr(trust_store, "adopt", adopt)
    clock[0] = NOW + 3 * 86400  # alice's key has expired since
    host = Host(root, clock=lambda: clock[0])
    assert host.status()["current"]["sequence"] == 2
    assert config(root)["trust_sequence"] == 2
    host.apply(write_bundle(tmp_path / "b3.tar", spec(3), bob))
    assert motd(root) == b"motd 3\n"


def test_chained_rotations_on_the_stick_are_adopted_in_turn(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    """alice -> bob (sequence 2), then bob -> carol (3, signed by bob and carol, which
    the trust of the start of the poll refuses), and 4 co-signed by bob and carol:
    both rotations are adopted, and bob, revoked by the second, signs nothing more."""
    alice, bob, carol = keys["alice"], keys["bob"], keys["carol"]
    inbox = _trusting_alice_with_an_inbox(host, tmp_path, alice)
    write_bundle(inbox / "b2.tar", spec(2), alice, bob,
                 trust=TrustUpdate(signers_text(bob), threshold=1))
    write_bundle(inbox / "b3.tar", spec(3), bob, carol,
                 trust=TrustUpdate(signers_text(carol), threshold=1))
    write_bundle(inbox / "b4.tar", spec(4), bob, carol)
    outcomes = _watch_once(host, inbox)
    assert outcomes == {"b2.tar": "applied", "b3.tar": "applied", "b4.tar": "applied"}
    assert config(host)["trust_sequence"] == 3
    assert motd(host) == b"motd 4\n"
    with pytest.raises(SignatureError):
        Host(host).apply(write_bundle(tmp_path / "b5.tar", spec(5), bob))


def test_watch_applies_a_rotation_that_resets_the_sequence(
        host: Path, tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    """A leaked key pushed the sequence to 10**9; the recovery rotation carries a lower
    one and resets it. The watcher must not skip it as 'not above' the sequence it
    exists to reset."""
    alice, bob = keys["alice"], keys["bob"]
    inbox = _trusting_alice_with_an_inbox(host, tmp_path, alice)
    Host(host).apply(write_bundle(tmp_path / "evil.tar", spec(10**9), alice))
    write_bundle(inbox / "r2.tar", spec(2), alice, bob,
                 trust=TrustUpdate(signers_text(bob), threshold=1, reset_sequence=True))
    [o] = Watcher(Host(host), [inbox], settle=0.0).run(0.05, once=True)
    assert o.result == "applied", o
    assert config(host)["trust_sequence"] == 2
    assert motd(host) == b"motd 2\n"
