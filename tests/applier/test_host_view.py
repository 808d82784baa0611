"""A host reads its own part of a fleet manifest, and skips a payload that cannot matter.

A fleet bundle's manifest lists every file of every host (110,000 entries for 200
hosts); a host builds and checks its own entries in full and takes only the blob
table (digest, size) from the others, while every payload member is still hashed.
Re-applying the current bundle, with every content already in the content store,
does not read the payload at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from applier.apply import Host
from applier.errors import (
    DigestMismatchError,
    ExitCode,
    ManifestError,
    StateError,
    VerificationError,
)
from applier.manifest import Manifest, canonical_json
from applier.state import State

from factory import BundleSpec, FileSpec, KeyPair, sign_bytes, snapshot

MOTD = "/etc/motd"
SITE = "/etc/nginx/conf.d/app.conf"


def fleet(seq: int = 1) -> BundleSpec:
    return BundleSpec({
        "frodo": {MOTD: FileSpec(b"welcome to frodo\n", mode=0o600), SITE: b"server {}\n"},
        "camelot": {MOTD: b"camelot\n", "/etc/shared.conf": b"server {}\n"},
    }, sequence=seq, commit=f"{seq:040x}")


def write_with_manifest(spec: BundleSpec, out: Path, key: KeyPair, doc: dict[str, object]
                        ) -> Path:
    """The bundle with a hand-edited (then re-signed, canonical) manifest."""
    data = canonical_json(doc)
    return spec.write(out, manifest_bytes=data, signature=sign_bytes(data, key))


def test_a_malformed_entry_of_another_host_does_not_stop_this_host(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    spec = fleet()
    doc = spec.manifest().to_dict()
    doc["hosts"]["camelot"]["files"][0]["path"] = "etc/not-absolute"
    data = canonical_json(doc)
    # The whole manifest is invalid (the builder and gitops-bundle verify see that) ...
    with pytest.raises(ManifestError, match="not an absolute path"):
        Manifest.from_bytes(data)
    # ... but frodo's view is valid, and applying it gives frodo exactly its files.
    view = Manifest.from_bytes(data, "frodo")
    assert list(view.hosts) == ["frodo"]
    assert view.host_names == ("camelot", "frodo")
    bundle = write_with_manifest(spec, tmp_path / "b.tar", signing_key, doc)
    Host(root).apply(bundle)
    assert (root / "etc/motd").read_bytes() == b"welcome to frodo\n"


def test_a_malformed_entry_of_this_host_is_refused(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    spec = fleet()
    doc = spec.manifest().to_dict()
    doc["hosts"]["frodo"]["files"][0]["mode"] = "0999"
    bundle = write_with_manifest(spec, tmp_path / "b.tar", signing_key, doc)
    before = snapshot(root)
    with pytest.raises(ManifestError, match="mode"):
        Host(root).apply(bundle)
    assert snapshot(root) == before


def test_blobs_of_other_hosts_are_still_verified(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    spec = fleet()
    camelot_only = hashlib.sha256(b"camelot\n").hexdigest()
    members = [(n, b"camELOT\n" if n == f"blobs/{camelot_only}" else d)
               for n, d in spec.members()]
    bundle = spec.write(tmp_path / "b.tar", signing_key, members=members)
    before = snapshot(root)
    with pytest.raises(DigestMismatchError, match=camelot_only):
        Host(root).apply(bundle)
    with pytest.raises(DigestMismatchError):
        Host(root).verify(bundle)
    assert snapshot(root) == before


@pytest.mark.parametrize(("what", "value", "reason"), [
    ("size", 3, "two different sizes"),
    ("sha256", "not-a-digest", "invalid value"),
    ("size", True, "two different sizes"),
])
def test_the_blob_table_from_other_hosts_is_checked(
        root: Path, tmp_path: Path, signing_key: KeyPair, what: str, value: object,
        reason: str) -> None:
    spec = fleet()
    doc = spec.manifest().to_dict()
    # camelot's shared.conf has the same content (so the same blob) as frodo's site.
    doc["hosts"]["camelot"]["files"][1][what] = value
    bundle = write_with_manifest(spec, tmp_path / "b.tar", signing_key, doc)
    with pytest.raises(ManifestError, match=reason):
        Host(root).apply(bundle)


def test_a_view_is_not_a_manifest_to_serialise(signing_key: KeyPair) -> None:
    del signing_key
    data = fleet().manifest().to_bytes()
    assert Manifest.from_bytes(data).to_bytes() == data
    with pytest.raises(ValueError, match="signed bytes"):
        Manifest.from_bytes(data, "frodo").to_bytes()
    assert Manifest.from_bytes(data, "frodo").blobs == Manifest.from_bytes(data).blobs


def test_host_not_in_bundle_names_the_hosts_it_is_for(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    spec = BundleSpec({"camelot": {MOTD: b"x\n"}, "rivendell": {MOTD: b"y\n"}})
    bundle = spec.write(tmp_path / "b.tar", signing_key)
    with pytest.raises(Exception, match="it is for: camelot, rivendell") as e:
        Host(root).apply(bundle)
    assert getattr(e.value, "exit_code", None) == ExitCode.POLICY


# -- re-applying the current bundle -------------------------------------------------------


def corrupt_copy(spec: BundleSpec, out: Path, key: KeyPair) -> Path:
    """The same signed manifest, with one of frodo's payload members damaged."""
    motd = hashlib.sha256(b"welcome to frodo\n").hexdigest()
    members = [(n, b"X" * len(d) if n == f"blobs/{motd}" else d) for n, d in spec.members()]
    return spec.write(out, key, members=members)


def test_reapplying_the_current_bundle_does_not_read_its_payload(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    spec = fleet()
    host = Host(root)
    host.apply(spec.write(tmp_path / "b.tar", signing_key))
    damaged = corrupt_copy(spec, tmp_path / "damaged.tar", signing_key)
    # A drifted file is put back from the content store, not from the bundle.
    (root / "etc/motd").write_bytes(b"edited by hand\n")
    report = host.apply(damaged)
    assert not report.payload_read
    assert report.to_dict()["payload_read"] is False
    assert [c.path for c in report.plan.changes] == [MOTD]
    assert (root / "etc/motd").read_bytes() == b"welcome to frodo\n"
    assert State(host.layout).audit_records()[-1]["payload_read"] is False
    # Nothing drifted: a no-op that writes only its audit record.
    report = host.apply(damaged)
    assert report.noop
    assert not report.payload_read
    # verify reads everything, always.
    with pytest.raises(DigestMismatchError):
        host.verify(damaged)


def test_the_payload_is_read_when_the_content_store_lacks_a_file(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    spec = fleet()
    host = Host(root)
    good = spec.write(tmp_path / "b.tar", signing_key)
    host.apply(good)
    motd = hashlib.sha256(b"welcome to frodo\n").hexdigest()
    host.state.object_path(motd).unlink()
    damaged = corrupt_copy(spec, tmp_path / "damaged.tar", signing_key)
    before = snapshot(root)
    with pytest.raises(DigestMismatchError, match=motd):
        host.apply(damaged)
    assert snapshot(root) == before
    report = host.apply(good)
    assert report.payload_read
    assert report.noop
    assert host.state.has_object(motd)


def test_a_new_bundle_is_always_read_in_full(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    host = Host(root)
    host.apply(fleet(1).write(tmp_path / "b1.tar", signing_key))
    # Same contents (all in the store already), but a new signed manifest.
    damaged = corrupt_copy(fleet(2), tmp_path / "b2.tar", signing_key)
    with pytest.raises(DigestMismatchError):
        host.apply(damaged)
    assert json.loads((host.layout.current).read_bytes())["sequence"] == 1


def test_reapplying_the_current_bundle_reuses_the_view_it_kept(
        root: Path, tmp_path: Path, signing_key: KeyPair, other_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fleet()
    bundle = spec.write(tmp_path / "b.tar", signing_key)
    Host(root).apply(bundle)
    parsed: list[str | None] = []
    real = Manifest.from_bytes

    def spy(data: bytes, host: str | None = None) -> Manifest:
        parsed.append(host)
        return real(data, host)

    monkeypatch.setattr(Manifest, "from_bytes", staticmethod(spy))
    report = Host(root).apply(bundle)
    assert report.noop
    assert parsed == []  # the manifest was not parsed again ...
    # ... but its signatures were checked: the same bytes signed by an untrusted key.
    with pytest.raises(VerificationError):
        Host(root).apply(spec.write(tmp_path / "untrusted.tar", other_key))
    # A damaged view falls back to the signed bytes.
    view = root / "var/lib/gitops-apply/bundles" / spec.manifest().bundle_id / "view.json"
    view.write_text("{")
    assert Host(root).apply(bundle).noop
    assert parsed == ["frodo"]
    # So does one kept for other bytes.
    rest = real(spec.manifest().to_bytes(), "frodo").view_rest()
    view.write_text(json.dumps({**rest, "host": "frodo", "manifest_sha256": "0" * 64}))
    assert Host(root).apply(bundle).noop
    assert parsed == ["frodo", "frodo"]


def test_a_damaged_store_file_is_set_aside_and_the_next_apply_heals_it(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """Bit rot in the content store is the host's fault, not the bundle's: a host-state
    error (exit 9: watch defers, never rejects), the damaged copy set aside, and the
    same bundle applied again reads that content from its payload."""
    content = b"shared content\n"
    digest = hashlib.sha256(content).hexdigest()
    host = Host(root)
    host.apply(BundleSpec({"frodo": {"/etc/a.conf": content}}, sequence=1,
                          commit="1" * 40).write(tmp_path / "b1.tar", signing_key))
    host.state.object_path(digest).write_bytes(b"shared c0ntent\n")
    b2 = BundleSpec({"frodo": {"/etc/a.conf": content, "/etc/b.conf": content}},
                    sequence=2, commit="2" * 40).write(tmp_path / "b2.tar", signing_key)
    before = snapshot(root / "etc")
    with pytest.raises(StateError, match="damaged on disk") as e:
        host.apply(b2)
    assert e.value.exit_code == ExitCode.HOST_CONFIG
    assert snapshot(root / "etc") == before
    assert not host.state.has_object(digest)
    report = host.apply(b2)
    assert report.payload_read
    assert (root / "etc/b.conf").read_bytes() == content
    assert hashlib.sha256(host.state.object_path(digest).read_bytes()).hexdigest() == digest
