"""Start-up: each command imports only what it uses.

A no-op re-apply or a ``status`` is mostly interpreter start-up and imports, so the
modules only some commands need (cryptography for a signature, subprocess for a
command, PyYAML for the host config, drift, watch, metrics) must not creep back onto
every command's path. Each command runs in a fresh interpreter that then lists the
modules it loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from applier.cli import main

from factory import BundleSpec, KeyPair, loaded

# Loaded only by the commands (or the steps of one) that need them.
ON_DEMAND = {"applier.drift", "applier.watch", "applier.metrics", "cryptography", "click",
             "subprocess", "difflib", "secrets", "yaml"}


@pytest.fixture
def applied(root: Path, tmp_path: Path, signing_key: KeyPair) -> Path:
    """A bundle already applied to ``root`` (so apply is a no-op re-apply)."""
    bundle = BundleSpec({"frodo": {"/etc/motd": b"hello\n"}}).write(tmp_path / "b.tar",
                                                                    signing_key)
    assert main(["--root", str(root), "apply", str(bundle)]) == 0
    return bundle


# PyYAML is in none: the host config comes from its parse cache (test_config_cache.py).
@pytest.mark.parametrize(("args", "needed"), [
    (("status",), {"applier.drift"}),
    (("history",), set()),  # reads only the audit log, not even the host config
    (("drift",), {"applier.drift"}),
    (("verify", "BUNDLE"), {"cryptography"}),
    # No metrics file configured: no metrics; no command runs, nothing to diff.
    (("apply", "BUNDLE"), {"cryptography"}),
], ids=["status", "history", "drift-check", "verify", "no-op-apply"])
def test_command_imports_only_what_it_needs(
        root: Path, tmp_path: Path, applied: Path, capsys: pytest.CaptureFixture[str],
        args: tuple[str, ...], needed: set[str]) -> None:
    capsys.readouterr()
    modules = loaded(tmp_path, root, *(str(applied) if a == "BUNDLE" else a for a in args))
    assert needed <= modules
    assert sorted((ON_DEMAND - needed) & modules) == []
