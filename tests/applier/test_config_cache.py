"""The host config's parse cache: never stale, never trusted over config.yaml.

``gitops-apply`` keeps config.yaml already parsed in the state dir, so a command need not
import PyYAML. These tests hold what an operator relies on: an edit of config.yaml
takes effect at the very next command; a read-only command or a refused apply writes
nothing, not even the cache; a torn, foreign or stale cache is ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hostile import run_apply

import applier
from applier import config as config_module
from applier.apply import Host
from applier.cli import main
from applier.config import HostConfig
from applier.errors import ExitCode
from applier.paths import HostLayout

from factory import BundleSpec, KeyPair, loaded, snapshot


def bundle(tmp_path: Path, key: KeyPair, name: str = "b.tar") -> Path:
    return BundleSpec({"frodo": {"/etc/motd": b"hello\n"}}).write(tmp_path / name, key)


def edit(root: Path, old: str, new: str) -> None:
    path = HostLayout(root).config_file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def cached(root: Path) -> tuple[HostConfig, str | None]:
    layout = HostLayout(root)
    return HostConfig.load_cached(layout.config_file, layout.config_cache)


def test_init_caches_the_config_it_writes(root: Path) -> None:
    config, digest = cached(root)
    assert digest is None  # a hit: nothing to parse, nothing to store
    path = HostLayout(root).config_file
    assert config == HostConfig.from_yaml(path.read_bytes(), path)


def test_an_edit_takes_effect_at_the_next_command(
        root: Path, tmp_path: Path, signing_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The cache was written for the config that allows /etc; the operator narrows it.
    edit(root, "- /etc\n", "- /opt\n")
    out = run_apply(capsys, root, bundle(tmp_path, signing_key))
    assert out.code == ExitCode.POLICY, out.lines
    assert "/etc/motd" in out.line


def test_read_only_commands_and_refused_applies_write_no_cache(
        root: Path, tmp_path: Path, signing_key: KeyPair, other_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    edit(root, "retain: 5", "retain: 7")
    before = snapshot(root)
    good = bundle(tmp_path, signing_key)
    for args in (["status"], ["verify", str(good)], ["history"]):
        main(["--root", str(root), *args])
        assert snapshot(root) == before, args
    assert run_apply(capsys, root, bundle(tmp_path, other_key, "bad.tar")).code != 0
    assert snapshot(root) == before
    # A successful apply caches the edited config; the next command reads it from there.
    assert run_apply(capsys, root, good).code == 0
    config, digest = cached(root)
    assert (config.retain, digest) == (7, None)
    assert "yaml" not in loaded(tmp_path, root, "status")


@pytest.mark.parametrize("content", [
    b"",
    b"{\"version\": ",
    b"[]",
    # Another release's cache of the same bytes: its meaning of the keys may differ.
    json.dumps({"version": "0.0.0/1", "config_sha256": "SAME", "config": {"host": "sam"}}),
    # The right key, but what it holds is not a valid config: the YAML decides.
    json.dumps({"version": "CURRENT", "config_sha256": "SAME", "config": {"host": "a b"}}),
    # A config cached for other bytes (config.yaml edited since).
    json.dumps({"version": "CURRENT", "config_sha256": "0" * 64, "config": {"host": "sam"}}),
], ids=["empty", "torn", "not-an-object", "other-version", "invalid-config", "stale"])
def test_a_bad_cache_is_ignored(root: Path, content: bytes | str) -> None:
    layout = HostLayout(root)
    digest = hashlib.sha256(layout.config_file.read_bytes()).hexdigest()
    if isinstance(content, str):
        content = content.replace("SAME", digest).replace(
            "CURRENT", config_module._CACHE_VERSION).encode()
    layout.config_cache.write_bytes(content)
    config, fresh = cached(root)
    assert config.host == "frodo"
    assert fresh == digest  # parsed from the YAML, to be cached again


def test_a_cache_of_other_bytes_is_never_served(root: Path) -> None:
    """The cache of the old config.yaml is not used for the new one, even if valid."""
    old_config, _ = cached(root)
    edit(root, "retain: 5", "retain: 9")
    config, digest = cached(root)
    assert (old_config.retain, config.retain) == (5, 9)
    assert digest is not None
    # The old cache stays until a successful locked operation replaces it.
    assert json.loads(HostLayout(root).config_cache.read_text())["config"]["retain"] == 5


def test_config_that_is_not_utf8_is_one_line_error(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    HostLayout(root).config_file.write_bytes(b"host: fr\xffdo\n")
    capsys.readouterr()
    assert main(["--root", str(root), "status"]) == ExitCode.HOST_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert "config.yaml: not UTF-8" in err[0]


@pytest.mark.parametrize(("append", "message"), [
    ("threshold: 1\n", r"config\.yaml:\d+: duplicate key 'threshold' \(first at line \d+\)"),
    ("1: x\nfoo: y\n", r"config\.yaml: unknown key 1"),
    ("allowed_signers: /etc/ssh/allowed_signers\n",
     (r"config\.yaml: allowed_signers must be a file name in /etc/gitops-apply, not "
      r"'/etc/ssh/allowed_signers'")),
], ids=["duplicate-key", "unknown-keys-of-two-types", "allowed-signers-a-path"])
def test_config_mistakes_are_one_line_errors(
        root: Path, capsys: pytest.CaptureFixture[str], append: str, message: str) -> None:
    """A second 'threshold: 1' appended below 'threshold: 2' must not silently lower
    k-of-n (PyYAML keeps the last of two keys)."""
    edit(root, "threshold: 1", "threshold: 2")
    config = HostLayout(root).config_file
    text = config.read_text()
    if append.startswith("allowed_signers:"):  # replaces the key rather than repeat it
        text = "".join(line for line in text.splitlines(keepends=True)
                       if not line.startswith("allowed_signers:"))
    config.write_text(text + append)
    capsys.readouterr()
    assert main(["--root", str(root), "status"]) == ExitCode.HOST_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert re.search(message, err[0]), err


def test_a_cache_an_older_release_wrote_is_not_served(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The release before this one kept the last of two 'threshold:' keys: its parse
    of such a config, cached, must not outlive the upgrade that refuses it."""
    layout = HostLayout(root)
    config = layout.config_file
    config.write_text(config.read_text().replace("threshold: 1", "threshold: 2")
                      + "threshold: 1\n")
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    old = HostConfig(host="frodo", threshold=1)
    layout.config_cache.write_text(json.dumps({
        "version": f"{applier.__version__}/1", "config_sha256": digest,
        "config": old.to_dict()}))
    capsys.readouterr()
    assert main(["--root", str(root), "status"]) == ExitCode.HOST_CONFIG
    assert "duplicate key 'threshold'" in capsys.readouterr().err


def test_host_uses_the_cached_config(root: Path) -> None:
    layout = HostLayout(root)
    # The cache names a different retain for the current bytes: proof it is read.
    data = json.loads(layout.config_cache.read_text())
    data["config"]["retain"] = 3
    layout.config_cache.write_text(json.dumps(data))
    assert Host(root).config.retain == 3
