"""A host reads its view of a manifest one host at a time, and accepts exactly what the
whole-document parse accepts.

``Manifest.from_bytes(data, host)`` never builds the whole document as Python objects
(about 200 MiB for a 200-host fleet's 26 MB); ``Manifest._from_document`` is the
reference path (``json.loads``, then the canonical-form check). Whatever bytes a signer
put in ``manifest.json``, the two must give the same manifest or the same error.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from applier import manifest as manifest_module
from applier.errors import ManifestError
from applier.manifest import (
    Command,
    FileEntry,
    HostEntry,
    Manifest,
    TrustUpdate,
    _entry_pattern,
    canonical_json,
)

from factory import BundleSpec, FileSpec


def _fleet(hosts: int = 3, files: int = 3) -> Manifest:
    shared = {f"/etc/shared/{i}-ü.conf": f"shared {i}!\n".encode() for i in range(files)}
    spec = BundleSpec({
        f"node-{h:03d}": {**shared, **{
            f"/etc/app/{i}.conf": FileSpec(f"node {h} file {i} ü\n".encode(),
                                           on_change=("systemctl reload app",))
            for i in range(files)}}
        for h in range(hosts)
    }, expires=2_000_000_000)
    m = spec.manifest()
    return dataclasses.replace(m, trust=TrustUpdate("ops ssh-ed25519 AAAA\n", threshold=1))


def _outcome(parse: Callable[[bytes, str], Manifest], data: bytes, host: str,
             ) -> tuple[Any, ...]:
    try:
        m = parse(data, host)
    except ManifestError as e:
        return ("error", str(e))
    return ("ok", m, list(m.blobs.items()), m.host_names)


def _same_outcome(data: bytes, host: str = "node-001") -> tuple[Any, ...]:
    view = _outcome(Manifest.from_bytes, data, host)
    assert view == _outcome(Manifest._from_document, data, host)
    return view


def test_a_valid_fleet_manifest_gives_the_same_view_both_ways() -> None:
    data = _fleet().to_bytes()
    for host in ("node-000", "node-001", "node-002", "not-in-bundle"):
        outcome = _same_outcome(data, host)
        assert outcome[0] == "ok"


def _swap_first_members(data: bytes) -> bytes:
    """The same members, the first two in the wrong order (valid names, valid JSON)."""
    doc = json.loads(data)
    first, second, *rest = doc.items()
    return json.dumps(dict([second, first, *rest]), separators=(",", ":"),
                      ensure_ascii=False).encode()


# Each edit keeps the JSON meaning (or breaks it) but not the one byte form.
EDITS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("space after a colon", lambda b: b.replace(b'"format":', b'"format": ', 1)),
    ("space between hosts", lambda b: b.replace(b']},"node-001"', b']}, "node-001"', 1)),
    ("space inside an entry", lambda b: b.replace(b'"drift":', b'"drift" :', 1)),
    ("newline at the end", lambda b: b + b"\n"),
    ("space at the start", lambda b: b" " + b),
    ("byte order mark", lambda b: b"\xef\xbb\xbf" + b),
    ("trailing garbage", lambda b: b + b"x"),
    ("two documents", lambda b: b + b"{}"),
    ("truncated", lambda b: b[:-1]),
    ("escaped slash", lambda b: b.replace(b"/etc/app/0.conf", b"\\/etc/app/0.conf", 1)),
    ("unicode escape for a plain letter",
     lambda b: b.replace(b'"builder":"', b'"builder":"\\u0067', 1)),
    ("escaped non-ASCII", lambda b: b.replace("ü".encode(), b"\\u00fc", 1)),
    ("lone surrogate escape", lambda b: b.replace(b'"builder":"', b'"builder":"\\ud800', 1)),
    ("float size", lambda b: b.replace(b'"size":10', b'"size":10.0', 1)),
    ("exponent size", lambda b: b.replace(b'"size":10', b'"size":1e1', 1)),
    ("negative zero", lambda b: b.replace(b'"retries":0', b'"retries":-0', 1)),
    ("leading zero", lambda b: b.replace(b'"retries":0', b'"retries":00', 1)),
    ("NaN", lambda b: b.replace(b'"retries":0', b'"retries":NaN', 1)),
    ("unknown key at the top", lambda b: b.replace(b'"builder":', b'"zbuilder":', 1)),
    ("two members swapped at the top", _swap_first_members),
    ("hosts object closed after the first host",
     lambda b: b.replace(b']},"node-001"', b']}}"node-001"', 1)),
    ("host object closed with a bracket",
     lambda b: b.replace(b']},"node-002"', b']],"node-002"', 1)),
    ("duplicate host", lambda b: b.replace(b'"node-002"', b'"node-001"', 1)),
    ("hosts out of order", lambda b: b.replace(b'"node-000"', b'"node-009"', 1)),
    ("duplicate top-level key", lambda b: b.replace(b'"builder":', b'"bundle_id":', 1)),
    ("duplicate key in an entry", lambda b: b.replace(b'"check":', b'"drift":', 1)),
    ("extra field in a host", lambda b: b.replace(b'"node-001":{"files":',
                                                   b'"node-001":{"extra":1,"files":', 1)),
    ("files not a list",
     lambda b: b.replace(b'"node-001":{"files":[', b'"node-001":{"files":{"a":[', 1)
                .replace(b']},"node-002"', b']}},"node-002"', 1)),
    ("host not an object", lambda b: b.replace(b'"node-001":{"files":[', b'"node-001":[[', 1)
                                      .replace(b']},"node-002"', b']],"node-002"', 1)),
    ("entry not an object", lambda b: b.replace(b'"node-001":{"files":[',
                                                 b'"node-001":{"files":[1,', 1)),
    ("empty hosts", lambda b: b[:b.index(b'"hosts":{') + 9] + b[b.index(b',"sequence":') - 1:]),
    ("no hosts key", lambda b: b.replace(b'"hosts":', b'"hostz":', 1)),
    ("deep nesting", lambda b: b.replace(b'"retries":0', b'"retries":' + b"[" * 100_000, 1)),
]


@pytest.mark.parametrize("edit", [e for _, e in EDITS], ids=[n for n, _ in EDITS])
def test_an_edited_manifest_gives_the_same_result_both_ways(
        edit: Callable[[bytes], bytes]) -> None:
    data = _fleet().to_bytes()
    edited = edit(data)
    assert edited != data, "the edit must change the bytes"
    outcome = _same_outcome(edited)
    assert outcome[0] == "error"


def test_a_lone_surrogate_escape_is_a_manifest_error_not_a_crash() -> None:
    # No canonical form exists for it (UTF-8 cannot encode a lone surrogate).
    data = _fleet().to_bytes().replace(b'"builder":"', b'"builder":"\\ud800', 1)
    with pytest.raises(ManifestError, match="not in canonical form"):
        Manifest.from_bytes(data)
    with pytest.raises(ManifestError, match="not in canonical form"):
        Manifest.from_bytes(data, "node-001")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_byte_edit_gives_the_same_result_both_ways(data: st.DataObject) -> None:
    base = _fleet(hosts=2, files=2).to_bytes()
    at = data.draw(st.integers(0, len(base) - 1), label="at")
    kind = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="kind")
    byte = data.draw(st.sampled_from(list(b' \n{}[]:,"\\0123456789-.eE' + b"abfnrtu")),
                     label="byte")
    if kind == "replace":
        edited = base[:at] + bytes([byte]) + base[at + 1:]
    elif kind == "insert":
        edited = base[:at] + bytes([byte]) + base[at:]
    else:
        edited = base[:at] + base[at + 1:]
    for host in ("node-000", "node-001"):
        _same_outcome(edited, host)


def _view_peak(parse: Callable[[bytes, str], Manifest], data: bytes) -> tuple[Manifest, int]:
    """node-007's view of ``data`` (a 60 x 20 ``_fleet``) and the peak memory it took."""
    tracemalloc.start()
    try:
        view = parse(data, "node-007")
        assert len(view.hosts["node-007"].files) == 40
        return view, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_host_view_never_holds_the_whole_document() -> None:
    # 60 hosts x 40 files: the host view's peak is a fraction of the whole parse's.
    data = _fleet(hosts=60, files=20).to_bytes()
    whole = _view_peak(Manifest._from_document, data)[1]
    piecewise = _view_peak(Manifest.from_bytes, data)[1]
    assert piecewise < whole / 3, (piecewise, whole)


def test_entries_shared_by_hosts_are_still_each_checked_in_place() -> None:
    # The same entry text recurs on every host; a non-canonical copy on one host is
    # not excused by the canonical copies elsewhere.
    m = _fleet()
    data = m.to_bytes()
    entry = canonical_json(m.hosts["node-002"].by_path()["/etc/shared/0-ü.conf"].to_dict())
    assert data.count(entry) == 3
    last = data.rindex(entry)
    spaced = entry.replace(b'","', b'", "', 1)
    edited = data[:last] + spaced + data[last + len(entry):]
    assert _same_outcome(edited, "node-000")[0] == "error"


def _edit_last_shared_copy(edit: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Apply ``edit`` to the last host's copy of a shared entry only: the copy a host
    meets after the same text, canonical, on the host before it."""
    def apply(data: bytes) -> bytes:
        m = Manifest.from_bytes(data)
        entry = canonical_json(m.hosts["node-002"].by_path()["/etc/shared/1-ü.conf"].to_dict())
        last = data.rindex(entry)
        return data[:last] + edit(entry) + data[last + len(entry):]
    return apply


# A later host's copy of a shared entry starts like the checked copy before it.
SHARED_COPY_EDITS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("one more member, out of order", lambda e: e[:-1] + b',"aa":0}'),
    ("a space before the separator", lambda e: e + b" "),
    ("a member cut short", lambda e: e[:-2] + b"}"),
    ("a duplicate member", lambda e: e[:-1] + b',"validate":[]}'),
    ("one byte changed", lambda e: e.replace(b'"mode":"0644"', b'"mode":"0645"')),
    ("a second object glued on", lambda e: e + b"{}"),
]


@pytest.mark.parametrize("edit", [e for _, e in SHARED_COPY_EDITS],
                         ids=[n for n, _ in SHARED_COPY_EDITS])
@pytest.mark.parametrize("host", ["node-001", "node-002"])
def test_a_later_hosts_copy_of_a_shared_entry_is_read_in_full(
        edit: Callable[[bytes], bytes], host: str) -> None:
    data = _fleet().to_bytes()
    edited = _edit_last_shared_copy(edit)(data)
    assert edited != data
    outcome = _same_outcome(edited, host)
    if edit is SHARED_COPY_EDITS[4][1]:
        assert outcome[0] == "ok"  # still canonical: only the mode differs
        assert outcome[1].blobs == Manifest._from_document(edited, host).blobs
    else:
        assert outcome[0] == "error"


def test_a_view_keeps_every_field_of_its_own_entries() -> None:
    m = _fleet()
    own = FileEntry(path="/etc/x", sha256="cd" * 32, size=3, mode=0o4755, owner="0",
                    group="adm", validate=(Command("true", timeout=9, retries=2, delay=1),),
                    drift="report")
    hosts = dict(m.hosts)
    hosts["node-001"] = HostEntry(tuple(sorted((*m.hosts["node-001"].files, own),
                                               key=lambda f: f.path)))
    data = dataclasses.replace(m, hosts=hosts).to_bytes()
    view = Manifest.from_bytes(data, "node-001")
    assert view.hosts["node-001"].by_path()["/etc/x"] == own
    assert view.trust == m.trust
    assert view.expires == m.expires


# Hosts whose file lists repeat runs of the host before them: a whole list, its start,
# its end, pieces with other entries between them, none. A host's view compares such
# runs as one text (``_run``), so it must still agree with the whole-document parse
# on every host, and on any edit inside a run.
_POOL = [f"/etc/pool/{i:02d}.conf" for i in range(12)]


@st.composite
def _runs(draw: st.DrawFn) -> bytes:
    hosts: dict[str, dict[str, bytes]] = {}
    for h in range(draw(st.integers(2, 5), label="hosts")):
        paths = draw(st.lists(st.sampled_from(_POOL), unique=True, max_size=len(_POOL)),
                     label=f"paths of node-{h:03d}")
        own = draw(st.sets(st.sampled_from(_POOL), max_size=3), label=f"own of node-{h:03d}")
        hosts[f"node-{h:03d}"] = {
            p: (f"{p} on node {h}" if p in own else f"{p}, shared").encode() for p in paths}
    if not any(hosts.values()):
        hosts["node-000"] = {_POOL[0]: b"one file\n"}
    return BundleSpec(hosts).manifest().to_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_runs_of_the_previous_hosts_entries_give_the_same_view(data: st.DataObject) -> None:
    base = data.draw(_runs(), label="manifest")
    names = list(json.loads(base)["hosts"])
    for host in names:
        assert _same_outcome(base, host)[0] == "ok"
    start = base.index(b'"hosts":{')
    end = base.index(b',"sequence":')
    at = data.draw(st.integers(start, end - 1), label="at")
    byte = data.draw(st.sampled_from(list(b' ,{}[]"0a')), label="byte")
    edited = base[:at] + bytes([byte]) + base[at + 1:]
    for host in names:
        _same_outcome(edited, host)


def test_a_space_after_a_comma_inside_a_long_shared_run_is_refused() -> None:
    # 40 shared entries, then the third host's run broken at its 25th separator.
    shared = {f"/etc/shared/{i:02d}.conf": b"same\n" for i in range(40)}
    data = BundleSpec({f"node-{h:03d}": dict(shared) for h in range(3)}).manifest().to_bytes()
    at = data.rindex(b'"node-002"')
    for _ in range(25):
        at = data.index(b'},{"', at) + 2
    edited = data[:at - 1] + b", " + data[at:]
    for host in ("node-000", "node-001", "node-002"):
        assert _same_outcome(edited, host)[0] == "error"


# Another host's entry is taken by its shape when it has the common one
# (``manifest._entry_pattern``): no parse, no re-serialisation. The shape must follow the
# model, and must never match text that is not the canonical form.
_plain = st.text(st.characters(blacklist_characters='"\\', blacklist_categories=("Cs", "Cc")),
                 max_size=12)
_command = st.builds(Command, run=_plain.filter(lambda s: s.strip() != ""),
                     timeout=st.integers(1, 86_400), retries=st.integers(0, 100),
                     delay=st.integers(0, 3600))
_commands = st.lists(_command, max_size=2).map(tuple)
_entry = st.builds(
    FileEntry, path=st.sampled_from(["/etc/a", "/opt/ü/b c", "/etc/x'y"]),
    sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
    size=st.integers(0, 1 << 40), mode=st.integers(0, 0o7777),
    owner=st.sampled_from(["root", "0", "www-data", "svc$"]), group=st.just("adm"),
    validate=_commands, check=_commands, on_change=_commands, health=_commands,
    drift=st.sampled_from(["revert", "report", "ignore"]))


@settings(max_examples=300, deadline=None)
@given(_entry)
def test_the_entry_shape_matches_every_plain_entry_with_its_digest_and_size(
        entry: FileEntry) -> None:
    text = canonical_json(entry.to_dict()).decode()
    match = _entry_pattern().fullmatch(text)
    assert match is not None, text
    assert (match[1], int(match[2])) == (entry.sha256, entry.size)


@settings(max_examples=1000, deadline=None)
@given(_entry, st.data())
def test_the_entry_shape_never_matches_a_text_that_is_not_canonical(
        entry: FileEntry, data: st.DataObject) -> None:
    text = canonical_json(entry.to_dict()).decode()
    at = data.draw(st.integers(0, len(text)), label="at")
    cut = data.draw(st.integers(0, 2), label="cut")
    piece = data.draw(st.sampled_from(
        [" ", ",", ":", "{", "}", "[", "]", '"', "\\", "\\n", "\\u0041", "\n", "\x01", "0",
         "-", "1.5", "1e3", "true", "null", '"a"', '"a":1', "ü", "\x7f"]), label="piece")
    # (A text decoded from UTF-8 never holds a lone surrogate.)
    edited = text[:at] + piece + text[at + cut:]
    match = _entry_pattern().fullmatch(edited)
    if match is None:
        return
    parsed = json.loads(edited)
    assert canonical_json(parsed).decode() == edited
    assert (match[1], int(match[2])) == (parsed["sha256"], parsed["size"])


def test_an_escape_in_another_hosts_entry_takes_the_full_parse() -> None:
    # "\u00fc" is valid JSON for "ü" but not the canonical form: the shape does not
    # match it, and the parse and re-serialisation refuse it on any host's view.
    data = _fleet().to_bytes()
    start = data.index(b'"node-000":')
    end = data.index(b'"node-001":')
    edited = data[:start] + data[start:end].replace("ü".encode(), b"\\u00fc", 1) + data[end:]
    assert edited != data
    for host in ("node-001", "node-002"):
        assert _same_outcome(edited, host) == ("error", "manifest.json is not in canonical form")


# The hosts object is decoded about a host at a time, the rest of the document apart:
# one character that needs four bytes (an emoji in a commit subject) would otherwise
# make the whole decoded text four bytes a character.
def test_a_wide_character_in_the_subject_does_not_widen_the_hosts_text() -> None:
    def view_peak(subject: str) -> tuple[int, int]:
        fleet = _fleet(hosts=60, files=20)
        data = dataclasses.replace(
            fleet, source=dataclasses.replace(fleet.source, subject=subject)).to_bytes()
        view, peak = _view_peak(Manifest.from_bytes, data)
        assert view.source.subject == subject
        return peak, len(data)

    plain, size = view_peak("deploy today")
    wide, _ = view_peak("deploy \U0001f680 today")
    # The whole text as one string would take 4 bytes a character: 3 x size more.
    assert wide < plain + size / 4, (wide, plain, size)


# Windows far smaller than a host: the first one, and every later one after a host
# longer than the last, ends inside the host (or inside a character of a non-ASCII
# name); the host is read again from a larger window, and the outcome is the same.
@st.composite
def _uneven(draw: st.DrawFn) -> bytes:
    names = ["a.conf", "ü/b.conf", "中/c.conf", "\U0001f680/d.conf", "e"]
    hosts: dict[str, dict[str, bytes | FileSpec]] = {}
    for h in range(draw(st.integers(1, 4), label="hosts")):
        picked = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)),
                      label=f"files of node-{h:03d}")
        hosts[f"node-{h:03d}"] = {
            f"/etc/{n}": FileSpec(f"{n} {h}".encode(), on_change=("reload " + "x" * h,))
            for n in picked}
    return BundleSpec(hosts).manifest().to_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_small_windows_give_the_same_view(data: st.DataObject) -> None:
    base = data.draw(_uneven(), label="manifest")
    window = data.draw(st.integers(1, 400), label="first window")
    edited = base
    if data.draw(st.booleans(), label="edit"):
        at = data.draw(st.integers(0, len(base) - 1), label="at")
        byte = data.draw(st.sampled_from(list(b' ,{}[]":\\0a\x80')), label="byte")
        edited = base[:at] + bytes([byte]) + base[at + 1:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(manifest_module, "_FIRST_WINDOW", window)
        for host in ("node-000", "node-001"):
            _same_outcome(edited, host)


@pytest.mark.parametrize("shift", [-1, 0, 1, 2])
def test_a_window_ending_at_a_hosts_last_byte_is_read_again(shift: int) -> None:
    # The first window ends just before, at, or just after the end of the first host's
    # object (``shift`` 0: its closing brace is the window's last character, and the
    # separator that must follow it is not in the window).
    data = _fleet().to_bytes()
    start = data.index(b'"hosts":') + len(b'"hosts":')
    first_end = data.index(b']},"node-001"') + 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(manifest_module, "_FIRST_WINDOW", first_end - start + shift)
        assert _same_outcome(data, "node-000")[0] == "ok"
