"""Anti-replay, expiry with tolerated skew, and a host clock that is set back.

The clock is frozen by handing ``Host`` a ``clock=`` (through the CLI via
``hostile.frozen_host``), so every case says exactly what time the host believes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import frozen_host, run_apply

from applier.apply import Host
from applier.errors import ExitCode, ExpiredError

from factory import CREATED, BundleSpec, KeyPair, sign_bytes, snapshot

DAY = 86_400
MOTD = "/etc/motd"


def spec(seq: int, created: int = CREATED, expires: int | None = None) -> BundleSpec:
    return BundleSpec({"frodo": {MOTD: f"motd {seq}\n".encode()}}, sequence=seq,
                      commit=f"{seq:040x}", created=created, expires=expires)


def test_reapplying_the_current_bundle_is_a_noop_success(
        root: Path, tmp_path: Path, signing_key: KeyPair, other_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    frozen_host(monkeypatch, CREATED + 60)
    bundle = spec(3).write(tmp_path / "b3.tar", signing_key)
    assert run_apply(capsys, root, bundle).code == 0
    etc = snapshot(root / "etc")
    again = run_apply(capsys, root, bundle, "--json")
    assert again.code == 0, again.lines
    assert snapshot(root / "etc") == etc
    # The same manifest with an extra (here untrusted) signature is the same bundle.
    manifest = spec(3).manifest().to_bytes()
    cosigned = spec(3).write(tmp_path / "b3x.tar", manifest_bytes=manifest,
                             signature=sign_bytes(manifest, signing_key)
                             + sign_bytes(manifest, other_key))
    assert run_apply(capsys, root, cosigned).code == 0
    assert snapshot(root / "etc") == etc
    assert Host(root).status()["highest_sequence"] == 3


@pytest.mark.parametrize(("seq", "match"), [
    (2, "sequence 2, not above 3"), (3, "sequence 3, not above 3")],
    ids=["older", "equal-but-different"])
def test_older_or_equal_sequence_is_refused(
        root: Path, tmp_path: Path, signing_key: KeyPair, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], seq: int, match: str) -> None:
    frozen_host(monkeypatch, CREATED + 60)
    assert run_apply(capsys, root, spec(3).write(tmp_path / "b3.tar", signing_key)).code == 0
    other = BundleSpec({"frodo": {MOTD: b"old\n"}}, sequence=seq, commit="e" * 40)
    before = snapshot(root)
    out = run_apply(capsys, root, other.write(tmp_path / "old.tar", signing_key))
    assert (out.code, len(out.lines)) == (ExitCode.POLICY, 1)
    assert match in out.line
    assert snapshot(root) == before


@pytest.mark.parametrize(("now_after_expiry", "ok"), [
    (-1, True), (0, True), (299, True), (300, True), (301, False), (30 * DAY, False)],
    ids=["before", "at", "within-skew", "at-skew", "past-skew", "long-past"])
def test_expiry_with_tolerated_skew(
        root: Path, tmp_path: Path, signing_key: KeyPair, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], now_after_expiry: int, ok: bool) -> None:
    expires = CREATED + DAY
    frozen_host(monkeypatch, expires + now_after_expiry)
    before = snapshot(root)
    out = run_apply(capsys, root, spec(1, expires=expires).write(tmp_path / "b.tar",
                                                                  signing_key))
    if ok:
        assert out.code == 0, out.lines
    else:
        assert out.code == ExitCode.POLICY
        assert "expired at" in out.line
        assert "tolerated skew 300s" in out.line
        assert snapshot(root) == before


def test_host_clock_set_back_cannot_revive_an_expired_bundle(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    """The host never lets "now" fall below the newest creation time it accepted."""
    t0 = CREATED
    stale = spec(2, created=t0 + DAY, expires=t0 + 2 * DAY).write(tmp_path / "b2.tar",
                                                                  signing_key)
    # Day 10: the host applies a bundle created then.
    Host(root, clock=lambda: t0 + 10 * DAY).apply(
        spec(1, created=t0 + 10 * DAY).write(tmp_path / "b1.tar", signing_key))
    # The RTC battery dies and the clock reads day 0: bundle 2 would look fresh, but
    # the host's floor is day 10, so it is expired (and also older, caught next).
    before = snapshot(root)
    with pytest.raises(ExpiredError, match="expired at"):
        Host(root, clock=lambda: t0).verify(stale)
    assert snapshot(root) == before


def test_clock_floor_applies_to_a_newer_sequence_too(
        root: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    t0 = CREATED
    Host(root, clock=lambda: t0 + 10 * DAY).apply(
        spec(1, created=t0 + 10 * DAY).write(tmp_path / "b1.tar", signing_key))
    # A newer sequence, but signed to expire on day 5: a frozen-clock replay of a
    # withheld bundle. The host's clock says day 0; the floor says day 10.
    withheld = spec(5, created=t0 + 4 * DAY, expires=t0 + 5 * DAY).write(
        tmp_path / "b5.tar", signing_key)
    before = snapshot(root)
    with pytest.raises(ExpiredError):
        Host(root, clock=lambda: t0).apply(withheld)
    assert snapshot(root) == before
