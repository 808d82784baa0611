"""Fuzz target for the bundle reader: any bytes in, a clean refusal or the seed out.

The property: for any input, ``read_bundle`` either raises one of the applier's own
errors (``ApplierError``: a one-line refusal with an exit code) or it accepts, and
then the accepted manifest and every member are exactly a seed bundle's signed bytes.
Any other exception (``IndexError``, ``struct.error``, ``MemoryError``...) is a parser
bug, and a hang is a wedge. Only the reader is exercised: no host is touched.

Run it longer than the test suite does, with either engine (see docs/SECURITY.md):

    python3 tests/fuzz/fuzz_bundle_reader.py --hypothesis --examples 100000
    python3 tests/fuzz/fuzz_bundle_reader.py -atheris_runs=1000000 corpus/   # atheris

The seed corpus is a genuine bundle (plain, gzip, zstd) signed by a fresh key.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from applier.bundle import read_bundle
from applier.errors import ApplierError
from applier.sshsig import AllowedSigners
from applier.verify import TrustPolicy

from factory import CREATED, BundleSpec, make_key

NOW = CREATED + 3600
SPEC = BundleSpec({"frodo": {"/etc/motd": b"hello\n", "/opt/app.conf": b"k" * 700},
                   "camelot": {"/etc/motd": b"camelot\n"}}, sequence=7, commit="7" * 40)


@functools.cache
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="gitops-fuzz-"))


@functools.cache
def trust() -> TrustPolicy:
    key = _key()
    return TrustPolicy(AllowedSigners.from_text(key.signers_line(), "fuzz"))


@functools.cache
def _key():  # type: ignore[no-untyped-def]  # factory.KeyPair; cached across runs
    return make_key(_workdir(), "fuzz")


@functools.cache
def seeds() -> dict[str, bytes]:
    """The genuine bundles the corpus starts from, by compression."""
    out = {}
    for comp in ("none", "gzip", "zstd"):
        path = SPEC.write(_workdir() / f"seed-{comp}.tar", _key(), compression=comp)
        out[comp] = path.read_bytes()
    return out


@functools.cache
def signed_bytes() -> tuple[bytes, dict[str, str]]:
    return SPEC.manifest().to_bytes(), {n: hashlib.sha256(d).hexdigest()
                                        for n, d in SPEC.members()}


def check_one(data: bytes) -> bool:
    """Feed ``data`` to the reader; True if accepted. Raises AssertionError on a bug."""
    path = _workdir() / f"input-{os.getpid()}.tar"
    path.write_bytes(data)
    manifest, members = signed_bytes()
    seen: dict[str, hashlib._Hash] = {}

    class Sink:
        def __init__(self, name: str) -> None:
            self.h = seen.setdefault(name, hashlib.sha256())

        def write(self, chunk: bytes) -> None:
            self.h.update(chunk)

        def commit(self) -> None:
            pass

        def abort(self) -> None:
            pass

    try:
        result = read_bundle(path, trust(), NOW, sink=lambda n, d, s: Sink(n))
    except ApplierError as e:
        if "\n" in str(e).strip():
            raise AssertionError(f"multi-line error: {e!r}") from e
        return False
    # Accepted: then nothing signed may differ from the seed.
    assert result.verified.manifest_bytes == manifest
    assert {n: h.hexdigest() for n, h in seen.items()} == members
    return True


def _hypothesis(examples: int) -> None:
    from hypothesis import HealthCheck, given, settings  # noqa: PLC0415 - optional engine
    from hypothesis import strategies as st  # noqa: PLC0415

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(seeds())), st.data())
    def run(comp: str, data: st.DataObject) -> None:
        seed = bytearray(seeds()[comp])
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, max(0, len(seed) - 1)))
            op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            if op == "flip" and seed:
                seed[at] ^= data.draw(st.integers(1, 255))
            elif op == "insert":
                seed[at:at] = data.draw(st.binary(min_size=1, max_size=64))
            elif op == "delete":
                del seed[at:at + data.draw(st.integers(1, 1024))]
            else:
                del seed[at:]
        check_one(bytes(seed))

    run()


def _atheris(argv: list[str]) -> None:
    atheris = importlib.import_module("atheris")
    corpus = _workdir() / "corpus"
    corpus.mkdir(exist_ok=True)
    for comp, data in seeds().items():
        (corpus / comp).write_bytes(data)
    atheris.Setup([*argv, str(corpus)], lambda data: check_one(bytes(data)))
    atheris.Fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hypothesis", action="store_true", help="use hypothesis, not atheris")
    parser.add_argument("--examples", type=int, default=10_000)
    args, rest = parser.parse_known_args()
    if args.hypothesis:
        _hypothesis(args.examples)
        print(f"ok: {args.examples} hypothesis examples")  # noqa: T201 - a CLI
    else:
        _atheris([sys.argv[0], *rest])


if __name__ == "__main__":
    main()
