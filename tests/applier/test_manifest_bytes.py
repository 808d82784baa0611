"""The signed manifest bytes are the one canonical form, however they are assembled.

``Manifest.to_bytes`` joins canonical pieces (each distinct file entry serialised
once) instead of serialising the whole dict in one call; hosts reject any other byte
form, so the two must agree exactly, for every field a manifest can carry.
"""

from __future__ import annotations

import dataclasses

from applier.manifest import Command, FileEntry, HostEntry, Manifest, TrustUpdate, canonical_json

from factory import BundleSpec, FileSpec


def _rich_manifest() -> Manifest:
    spec = BundleSpec({
        "web-01": {
            "/etc/nginx/nginx.conf": FileSpec(b"events {}\n", validate=("nginx -t -c {path}",),
                                              on_change=("systemctl reload nginx",),
                                              health=("curl -fsS http://127.0.0.1/",)),
            "/etc/motd": FileSpec("grüße, 世界 \"quoted\" \\ tab\t\n".encode(), mode=0o600,
                                  drift="report"),
            "/opt/app/ünïcode name.conf": b"x\n",
        },
        "db-01": {"/etc/motd": b"db\n", "/etc/cron.d/backup": FileSpec(b"0 3 * * * root x\n",
                                                                        owner="0", group="0")},
    }, expires=2_000_000_000)
    m = spec.manifest()
    # The builder shares one FileEntry object between every host it fits.
    shared = FileEntry(path="/etc/ssh/banner", sha256="ab" * 32, size=5, mode=0o644,
                       check=(Command(run="true", timeout=5, retries=1, delay=2),))
    hosts = {name: HostEntry(tuple(sorted((*h.files, shared), key=lambda f: f.path)))
             for name, h in m.hosts.items()}
    trust = TrustUpdate("ops ssh-ed25519 AAAA\n", threshold=1, reset_sequence=True)
    return dataclasses.replace(m, hosts=hosts, trust=trust)


def test_to_bytes_is_the_one_call_canonical_serialisation() -> None:
    m = _rich_manifest()
    data = m.to_bytes()
    assert data == canonical_json(m.to_dict())
    assert Manifest.from_bytes(data) == m
    plain = BundleSpec({"frodo": {"/etc/motd": b"hi\n"}}).manifest()
    assert plain.to_bytes() == canonical_json(plain.to_dict())


def test_the_chunks_a_builder_writes_join_to_those_bytes() -> None:
    # A build writes the manifest to disk chunk by chunk (never the 26 MB of a fleet
    # whole in memory); whatever the chunk size, the file holds the signed bytes.
    m = _rich_manifest()
    canonical = canonical_json(m.to_dict())
    for size in (1, 100, 1 << 20):
        assert b"".join(m.canonical_chunks(size)) == canonical
    # Whole hosts: one chunk each when every host fills one, one in all when none does.
    assert len(list(m.canonical_chunks(1))) == len(m.hosts) + 1
    assert len(list(m.canonical_chunks(1 << 20))) == 1
