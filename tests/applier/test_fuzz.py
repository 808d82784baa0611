"""Property: a mutated bundle is refused cleanly, or it still carries every signed byte.

Hypothesis flips, inserts, deletes and truncates bytes of genuine bundles (plain,
gzip, zstd) at random offsets and lengths, and applies each through the real CLI to
a copy of a host that already runs an older bundle. Either the CLI exits with a
documented refusal code, prints exactly one line and leaves the root byte-for-byte
unchanged, or it applies and what it applied is exactly the signed content. Kept
small for the suite; ``tests/fuzz/fuzz_bundle_reader.py`` runs the reader longer.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
from hostile import frozen_host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from applier import cli as applier_cli
from applier.apply import init_host
from applier.errors import ExitCode

from factory import CREATED, BundleSpec, KeyPair, snapshot, write_allowed_signers

NOW = CREATED + 3600
REFUSALS = {ExitCode.VERIFICATION, ExitCode.POLICY}
FILES = {"/etc/motd": b"motd v2\n", "/opt/app/app.conf": b"k" * 700}
OLD = BundleSpec({"frodo": {"/etc/motd": b"motd v1\n"}}, sequence=1, commit="1" * 40)
NEW = BundleSpec({"frodo": dict(FILES), "camelot": {"/etc/motd": b"c\n"}}, sequence=2,
                 commit="2" * 40)
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair) -> dict[str, Path]:
    """A template host (applied sequence 1) and the genuine sequence-2 bundles."""
    d = tmp_path_factory.mktemp("fuzz")
    root = d / "template"
    init_host(root, "frodo", write_allowed_signers(d / "allowed", signing_key))
    out: dict[str, Path] = {"template": root, "dir": d}
    for comp in ("none", "gzip", "zstd"):
        out[comp] = NEW.write(d / f"new-{comp}.tar", signing_key, compression=comp)
    old = OLD.write(d / "old.tar", signing_key)
    assert applier_cli.main(["--root", str(root), "apply", str(old)]) == 0
    return out


@st.composite
def mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, bytes | int]]:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, size - 1))
        arg: bytes | int
        if op == "flip":
            arg = draw(st.integers(1, 255))
        elif op == "insert":
            arg = draw(st.binary(min_size=1, max_size=32))
        else:
            arg = draw(st.integers(1, 600))
        ops.append((op, at, arg))
    return ops


def mutate(data: bytes, ops: list[tuple[str, int, bytes | int]]) -> bytes:
    b = bytearray(data)
    for op, offset, arg in ops:
        at = min(offset, max(0, len(b) - 1))
        if op == "flip" and b and isinstance(arg, int):
            b[at] ^= arg
        elif op == "insert" and isinstance(arg, bytes):
            b[at:at] = arg
        elif op == "delete" and isinstance(arg, int):
            del b[at:at + arg]
        elif op == "truncate":
            del b[at:]
    return bytes(b)


def check(world: dict[str, Path], comp: str, ops: list[tuple[str, int, bytes | int]],
          n: list[int]) -> None:
    n[0] += 1
    root = world["dir"] / f"host-{comp}-{n[0]}"
    shutil.copytree(world["template"], root, symlinks=True)
    try:
        bundle = world["dir"] / f"mutated-{comp}-{n[0]}.tar"
        bundle.write_bytes(mutate(world[comp].read_bytes(), ops))
        before = snapshot(root)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = applier_cli.main(["--root", str(root), "apply", str(bundle)])
        lines = err.getvalue().splitlines()
        if code == 0:
            # Accepted: then every signed byte is the genuine one.
            for path, content in FILES.items():
                assert (root / path.lstrip("/")).read_bytes() == content
            retained = root / "var/lib/gitops-apply/bundles" / NEW.manifest().bundle_id
            assert (retained / "manifest.json").read_bytes() == NEW.manifest().to_bytes()
        else:
            assert code in REFUSALS, lines
            assert len(lines) == 1, lines
            assert lines[0].startswith("gitops-apply: error: ")
            assert "internal error" not in lines[0]
            assert snapshot(root) == before
        bundle.unlink()
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize(("comp", "examples"), [("none", 90), ("gzip", 70), ("zstd", 40)])
def test_mutated_bundle_is_refused_cleanly_or_unchanged_in_signed_bytes(
        world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, comp: str,
        examples: int) -> None:
    frozen_host(monkeypatch, NOW)
    size = world[comp].stat().st_size
    counter = [0]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=HEALTH)
    @given(mutations(size))
    def run(ops: list[tuple[str, int, bytes | int]]) -> None:
        check(world, comp, ops, counter)

    run()


def test_unmutated_bundles_apply(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: with no mutation each compression applies."""
    frozen_host(monkeypatch, NOW)
    for comp in ("none", "gzip", "zstd"):
        check(world, comp, [], [100])
