"""``gitops-bundle build --trust-update``: a real repo, real keys, checked by a host.

The rotation bundle is built with the old key, co-signed with the new one by
``gitops-bundle sign``, and judged by ``gitops-apply verify`` on a host that trusts
only the old key: refused before the co-signature, accepted after it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from applier import cli as applier_cli
from applier.apply import init_host
from applier.bundle import BundleFile
from applier.errors import ExitCode
from applier.manifest import Manifest
from bundler import cli as bundler_cli

from factory import KeyPair, make_key, write_allowed_signers


def manifest_of(bundle: Path) -> Manifest:
    with BundleFile(bundle) as f:
        return Manifest.from_bytes(f.signed_part()[0])


def test_build_with_trust_update_then_cosign(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    new = make_key(tmp_path, "newkey")
    new_signers = write_allowed_signers(tmp_path / "new_signers", new)
    bundle = tmp_path / "rotate.tar"
    assert bundler_cli.main(["build", str(fleet_repo), "--key", str(signing_key.private),
                             "-o", str(bundle), "--trust-update", str(new_signers),
                             "--reset-sequence"]) == 0
    trust = manifest_of(bundle).trust
    assert trust is not None
    assert trust.allowed_signers == new_signers.read_text()
    assert (trust.threshold, trust.reset_sequence) == (1, True)

    root = tmp_path / "frodo"
    init_host(root, "frodo", write_allowed_signers(tmp_path / "old", signing_key))
    capsys.readouterr()
    assert applier_cli.main(["--root", str(root), "verify", str(bundle)]) == \
        ExitCode.VERIFICATION
    assert "not signed by a threshold of the new keys" in capsys.readouterr().err
    cosigned = tmp_path / "rotate-cosigned.tar"
    assert bundler_cli.main(["sign", str(bundle), "--key", str(new.private), "-o",
                             str(cosigned)]) == 0
    assert applier_cli.main(["--root", str(root), "verify", str(cosigned)]) == 0


@pytest.mark.parametrize("args", [["--reset-sequence"], ["--trust-threshold", "2"]],
                         ids=["reset-alone", "threshold-alone"])
def test_trust_options_need_trust_update(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair, args: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    code = bundler_cli.main(["build", str(fleet_repo), "--key", str(signing_key.private),
                             "-o", str(tmp_path / "b.tar"), *args])
    assert code == ExitCode.USAGE
    assert "need --trust-update" in capsys.readouterr().err


def test_trust_update_with_too_few_keys_is_refused(
        fleet_repo: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    signers = write_allowed_signers(tmp_path / "one", signing_key)
    code = bundler_cli.main(["build", str(fleet_repo), "--key", str(signing_key.private),
                             "-o", str(tmp_path / "b.tar"), "--trust-update", str(signers),
                             "--trust-threshold", "2"])
    assert code != 0
    assert "fewer than --trust-threshold 2" in capsys.readouterr().err
    assert not (tmp_path / "b.tar").exists()
