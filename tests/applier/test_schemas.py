"""The JSON Schemas in schemas/ say the same as the classes that enforce them."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from applier.config import HostConfig
from applier.errors import HostConfigError, ManifestError
from applier.manifest import Manifest

from factory import BundleSpec, FileSpec

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def schema(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(data)
    return data


def valid_manifest() -> dict[str, Any]:
    spec = BundleSpec({"frodo": {"/etc/a.conf": FileSpec(b"a\n", validate=("true {path}",),
                                                         health=("true",)),
                                 "/opt/app/run.sh": FileSpec(b"#!/bin/sh\n", mode=0o755)},
                       "camelot": {"/etc/motd": b"hi\n"}}, expires=1_900_000_000)
    return spec.manifest().to_dict()


Mutation = Callable[[dict[str, Any]], None]


def _file(d: dict[str, Any]) -> dict[str, Any]:
    f: dict[str, Any] = d["hosts"]["frodo"]["files"][0]
    return f


BAD_MANIFESTS: dict[str, Mutation] = {
    "unknown-top-field": lambda d: d.update(extra=1),
    "unknown-file-field": lambda d: _file(d).update(color="red"),
    "format-2": lambda d: d.update(format=2),
    "sequence-zero": lambda d: d.update(sequence=0),
    "sequence-string": lambda d: d.update(sequence="1"),
    "bad-bundle-id": lambda d: d.update(bundle_id="x"),
    "relative-path": lambda d: _file(d).update(path="etc/a.conf"),
    "bad-sha": lambda d: _file(d).update(sha256="ab"),
    "mode-not-octal": lambda d: _file(d).update(mode="0999"),
    "mode-int": lambda d: _file(d).update(mode=420),
    "bad-owner": lambda d: _file(d).update(owner="a b"),
    "bad-drift": lambda d: _file(d).update(drift="sometimes"),
    "command-missing-timeout": lambda d: _file(d)["validate"][0].pop("timeout"),
    "command-timeout-zero": lambda d: _file(d)["validate"][0].update(timeout=0),
    "no-hosts": lambda d: d.update(hosts={}),
    "bad-host-name": lambda d: d["hosts"].update({"-x": {"files": []}}),
    "missing-git": lambda d: d.pop("git"),
    "bad-commit": lambda d: d["source"].update(commit="zz"),
    "trust-bad-threshold": lambda d: d.update(trust={"allowed_signers": "", "threshold": 0,
                                                     "reset_sequence": False}),
}


def test_valid_manifest_passes_both() -> None:
    d = valid_manifest()
    jsonschema.validate(d, schema("manifest.schema.json"))
    assert Manifest.from_dict(d).to_dict() == d


@pytest.mark.parametrize("mutate", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_invalid_manifest_fails_both(mutate: Mutation) -> None:
    d = copy.deepcopy(valid_manifest())
    mutate(d)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, schema("manifest.schema.json"))
    with pytest.raises(ManifestError):
        Manifest.from_dict(d)


VALID_CONFIGS = [
    {"host": "frodo"},
    {"host": "camelot", "retain": 10, "threshold": 2, "allowed_prefixes": ["/etc", "/opt"],
     "clock_skew": 0, "allow_special_modes": True, "drift": {"/etc/motd": "report"},
     "metrics_file": "/var/lib/node_exporter/gitops.prom"},
]
BAD_CONFIGS = {
    "no-host": {},
    "bad-host": {"host": "a b"},
    "unknown-key": {"host": "frodo", "retian": 5},
    "retain-zero": {"host": "frodo", "retain": 0},
    "threshold-bool": {"host": "frodo", "threshold": True},
    "relative-prefix": {"host": "frodo", "allowed_prefixes": ["etc"]},
    "bad-drift-policy": {"host": "frodo", "drift": {"/etc/motd": "never"}},
}


@pytest.mark.parametrize("config", VALID_CONFIGS)
def test_valid_config_passes_both(config: dict[str, Any]) -> None:
    jsonschema.validate(config, schema("config.schema.json"))
    HostConfig.from_dict(config)


@pytest.mark.parametrize("config", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_invalid_config_fails_both(config: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema("config.schema.json"))
    with pytest.raises(HostConfigError):
        HostConfig.from_dict(config)


def test_init_writes_a_config_the_schema_accepts(tmp_path: Path) -> None:
    import yaml  # noqa: PLC0415 - only this test reads YAML

    config = HostConfig(host="frodo")
    jsonschema.validate(yaml.safe_load(config.to_yaml()), schema("config.schema.json"))
