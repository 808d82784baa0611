"""gzip bundles are written as one member per ``GZIP_BLOCK`` of tar, compressed on all cores.

What a user relies on: the same input gives the same bytes, every gzip reader (GNU
``gzip``, the host's reader) sees exactly the plain tar, and memory stays bounded.
"""

from __future__ import annotations

import random
import subprocess
import zlib
from pathlib import Path

from applier.bundle import BundleFile
from bundler.writer import GZIP_BLOCK, Member, write_tar

from conftest import require_tool


def members(size: int) -> list[Member]:
    rnd = random.Random(size)  # noqa: S311 - test data, not a secret
    # Compressible but not trivially so, like rendered configs.
    data = b"".join(b"key%d = %d\n" % (i, rnd.randrange(1 << 20)) for i in range(size // 12))
    return [Member(f"blobs/{i:064x}", len(data), lambda: [data]) for i in range(3)]


def write(out: Path, compression: str, size: int) -> Path:
    write_tar(out, b"{}", b"sig", members(size), mtime=1_700_000_000, compression=compression)
    return out


def gzip_members(data: bytes) -> int:
    count = 0
    while data:
        d = zlib.decompressobj(wbits=31)
        d.decompress(data)
        assert d.eof
        data = d.unused_data
        count += 1
    return count


def test_large_payload_is_several_members_that_gzip_reads_as_the_plain_tar(
        tmp_path: Path) -> None:
    require_tool("gzip")
    size = GZIP_BLOCK  # three members of about that: more than two blocks of tar
    gz = write(tmp_path / "b.tar.gz", "gzip", size)
    plain = write(tmp_path / "b.tar", "none", size)
    blocks = -(-plain.stat().st_size // GZIP_BLOCK)
    assert blocks > 2
    assert gzip_members(gz.read_bytes()) == blocks
    out = subprocess.run(["gzip", "-dc", str(gz)], capture_output=True, check=True).stdout
    assert out == plain.read_bytes()
    with BundleFile(gz) as bundle:
        assert bundle.compression == "gzip"
        assert bundle.signed_part() == (b"{}", b"sig")


def test_same_input_same_bytes(tmp_path: Path) -> None:
    a = write(tmp_path / "a.tar.gz", "gzip", GZIP_BLOCK // 2)
    b = write(tmp_path / "b.tar.gz", "gzip", GZIP_BLOCK // 2)
    assert a.read_bytes() == b.read_bytes()
    assert gzip_members(a.read_bytes()) > 1


def test_small_bundle_is_one_member(tmp_path: Path) -> None:
    gz = write(tmp_path / "b.tar.gz", "gzip", 1000)
    assert gzip_members(gz.read_bytes()) == 1
