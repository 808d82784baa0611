"""The bundle's tar headers: what POSIX tar tools read, the same on every Python."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from applier import _tar

NAMES = ["manifest.json", "manifest.json.sig", "git/history.bundle", "blobs/" + "ab" * 32,
         "n" * 100]


def tarfile_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [0, 1, 511, 512, 1 << 30, 8**11 - 1])
def test_header_is_what_tarfile_writes(name: str, size: int) -> None:
    for mtime in (0, 1_790_000_000, 8**11 - 1):
        assert _tar.header_bytes(name, size, mtime) == tarfile_header(name, size, mtime)


def test_long_names_still_go_through_tarfile() -> None:
    name = "d" * 60 + "/" + "f" * 60
    assert _tar.header_bytes(name, 3, 0) == tarfile_header(name, 3, 0)


def test_gnu_tar_and_our_reader_read_what_we_write(tmp_path: Path) -> None:
    members = [(n, n.encode() * 3) for n in NAMES]
    out = io.BytesIO()
    for name, data in members:
        out.write(_tar.header_bytes(name, len(data), 1_790_000_000) + data
                  + _tar.padding(len(data)))
    out.write(_tar.end_of_archive(out.tell()))
    path = tmp_path / "t.tar"
    path.write_bytes(out.getvalue())
    listing = subprocess.run(["tar", "-tvf", str(path)], check=True, capture_output=True,
                             text=True).stdout.splitlines()
    assert [line.split()[-1] for line in listing] == NAMES
    assert all(line.startswith("-rw-r--r-- 0/0") for line in listing)
    out.seek(0)
    reader = _tar.TarReader(out, len(out.getvalue()))
    for name, data in members:
        header = reader.next_header()
        assert header is not None
        assert (header.name, header.size, header.mode) == (name, len(data), 0o644)
        assert b"".join(reader.data(header)) == data
    assert reader.next_header() is None
