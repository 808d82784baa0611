"""The node_exporter textfile parses as Prometheus text and says what the host is doing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from applier.cli import main
from applier.errors import ExitCode

from conftest import Systemctl
from factory import BundleSpec, FileSpec, KeyPair

MOTD = "/etc/motd"
ISSUE = "/etc/issue"


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return found[(name, tuple(sorted({"host": "frodo", **labels}.items())))]


def test_metrics_after_apply_drift_and_a_failed_apply(
        root: Path, tmp_path: Path, signing_key: KeyPair, systemctl: Systemctl,
        capsys: pytest.CaptureFixture[str]) -> None:
    prom = tmp_path / "textfile" / "gitops.prom"
    prom.parent.mkdir()
    spec = BundleSpec({"frodo": {MOTD: b"hi\n", ISSUE: FileSpec(b"x\n", drift="report")}},
                      sequence=4, commit="ab" * 20)
    b = spec.write(tmp_path / "b4.tar", signing_key)
    assert main(["--root", str(root), "--metrics-file", str(prom), "apply", str(b)]) == 0
    found = samples(prom)
    assert value(found, "gitops_bundle_sequence") == 4
    bundle_id = spec.manifest().bundle_id
    assert value(found, "gitops_bundle_info", bundle_id=bundle_id, commit="ab" * 20) == 1
    assert value(found, "gitops_last_apply_success", event="apply") == 1
    assert value(found, "gitops_last_apply_timestamp_seconds") > 1.7e9
    assert value(found, "gitops_retained_bundles") == 1
    assert ("gitops_drift_last_check_timestamp_seconds", (("host", "frodo"),)) not in found

    (root / "etc/motd").write_bytes(b"edited\n")
    (root / "etc/issue").write_bytes(b"edited\n")
    assert main(["--root", str(root), "drift", "--fix", "--metrics-file", str(prom)]) == \
        ExitCode.DRIFT
    found = samples(prom)
    assert value(found, "gitops_drift_files", policy="revert") == 1
    assert value(found, "gitops_drift_files", policy="report") == 1
    assert value(found, "gitops_drift_remaining_files") == 1
    assert value(found, "gitops_drift_last_check_timestamp_seconds") > 1.7e9

    # The host config's metrics_file (under --root in tests) is used without the option,
    # and a failed apply is reported as such.
    cfg = yaml.safe_load((root / "etc/gitops-apply/config.yaml").read_text())
    cfg["metrics_file"] = "/var/lib/node_exporter/gitops.prom"
    (root / "etc/gitops-apply/config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "var/lib/node_exporter").mkdir(parents=True)
    bad = BundleSpec({"frodo": {MOTD: FileSpec(b"v5\n", validate=("false",))}}, sequence=5,
                     commit="cd" * 20).write(tmp_path / "b5.tar", signing_key)
    assert main(["--root", str(root), "apply", str(bad)]) == ExitCode.VALIDATION
    found = samples(root / "var/lib/node_exporter/gitops.prom")
    assert value(found, "gitops_bundle_sequence") == 4
    assert value(found, "gitops_last_apply_success", event="apply") == 0
    assert value(found, "gitops_bad_bundles") == 1
    capsys.readouterr()


def test_status_json_has_drift_fields(
        root: Path, tmp_path: Path, signing_key: KeyPair, capsys: pytest.CaptureFixture[str],
        ) -> None:
    b = BundleSpec({"frodo": {MOTD: b"hi\n"}}).write(tmp_path / "b.tar", signing_key)
    assert main(["--root", str(root), "apply", str(b)]) == 0
    capsys.readouterr()
    assert main(["--root", str(root), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["drift"]["last_check"] is None
    (root / "etc/motd").unlink()
    assert main(["--root", str(root), "drift"]) == ExitCode.DRIFT
    capsys.readouterr()
    assert main(["--root", str(root), "status", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["drift"]
    assert d["drifted"] == 1
    assert d["drifted_files"] == [{"path": MOTD, "kind": "missing", "policy": "revert"}]
    assert main(["--root", str(root), "status"]) == 0
    assert "drift:    1 file(s) drifted" in capsys.readouterr().out
