"""gitops.yaml parsing: the example, variable precedence, file:line errors, and the schema.

The JSON Schema in ``schemas/`` is the documented contract and jsonschema is only a
test dependency: here every config is checked by both, and they must agree.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from applier.errors import ExitCode
from applier.manifest import Command
from bundler.config import RepoConfig, parse_vars_file
from bundler.errors import BuildError, RepoConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fleet" / "gitops.yaml"
SCHEMA = json.loads((ROOT / "schemas" / "gitops.schema.json").read_text())

BASE = """\
version: 1
vars:
  site: hq
groups:
  web:
    vars:
      role: web
  db: {}
hosts:
  frodo:
    groups: [web]
  camelot:
    groups: [db, web]
    vars:
      site: dr
files:
  - src: templates/motd.j2
    dest: /etc/motd
  - src: files/app.conf
    dest: /etc/app/{{ host }}.conf
    groups: [web]
    mode: "0640"
    owner: root
    group: adm
    validate: app --check {path}
    on_change:
      - systemctl daemon-reload
      - run: systemctl restart app
        timeout: 120
    health: {run: curl -fsS http://127.0.0.1/, retries: 5, delay: 2}
    drift: report
"""


def schema_accepts(text: str) -> bool:
    valid: bool = jsonschema.Draft202012Validator(SCHEMA).is_valid(yaml.safe_load(text))
    return valid


def edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the config")


# -- the happy path ---------------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_example_fleet_parses_and_matches_the_schema() -> None:
    text = EXAMPLE.read_text()
    assert schema_accepts(text)
    config = RepoConfig.parse(text)
    assert list(config.hosts) == ["frodo", "camelot"]
    assert config.hosts["frodo"].groups == ("web",)
    assert set(config.groups) == {"web", "backup"}
    nginx = next(f for f in config.files if f.dest == "/etc/nginx/nginx.conf")
    assert nginx.is_template
    assert nginx.validate == (Command("nginx -t -q -c {path}"),)
    assert nginx.check[0].run.startswith("nginx -t -q")
    assert nginx.health[0].retries == 5
    script = next(f for f in config.files if f.dest == "/opt/backup/backup.sh")
    assert script.mode == 0o755
    assert not script.selects(config.hosts["frodo"])
    assert script.selects(config.hosts["camelot"])


def test_base_config_fields() -> None:
    config = RepoConfig.parse(BASE, "infra/gitops.yaml")
    assert config.path == "infra/gitops.yaml"
    motd, app = config.files
    assert motd.hosts == motd.groups == ()
    assert motd.mode is None
    assert motd.drift == "revert"
    assert all(motd.selects(h) for h in config.hosts.values())
    assert app.mode == 0o640
    assert (app.owner, app.group) == ("root", "adm")
    assert app.on_change == (Command("systemctl daemon-reload"),
                             Command("systemctl restart app", timeout=120))
    assert app.health == (Command("curl -fsS http://127.0.0.1/", retries=5, delay=2),)
    assert app.drift == "report"
    assert app.dest == "/etc/app/{{ host }}.conf"  # rendered per host later
    assert app.where("mode") == f"infra/gitops.yaml:{line_of(BASE, 'mode:')}: files[1].mode"
    assert app.lines["on_change[1]"] == line_of(BASE, "- run: systemctl restart")


def test_null_sections_mean_empty() -> None:
    text = "version: 1\ngroups:\nhosts:\n  frodo:\nfiles:\n"
    assert schema_accepts(text)
    config = RepoConfig.parse(text)
    assert config.hosts["frodo"].groups == ()
    assert config.files == ()
    assert config.groups == {}


def test_yaml_anchors_and_merge_keys_share_settings() -> None:
    text = BASE.replace("files:\n", "files:\n  - &nginx\n    src: a.conf\n    dest: /etc/a.conf\n"
                        "    check: nginx -t\n  - <<: *nginx\n    src: b.conf\n"
                        "    dest: /etc/b.conf\n", 1)
    config = RepoConfig.parse(text)
    assert config.files[1].src == "b.conf"
    assert config.files[1].check == (Command("nginx -t"),)


def test_variable_precedence() -> None:
    config = RepoConfig.parse(BASE.replace("vars:\n  site: hq\n", (
        "vars:\n  site: hq\n  level: defaults\n  nested: {a: 1, b: 1}\n  items: [1, 2]\n"), 1))
    var_files: dict[str, dict[str, Any]] = {
        "vars/group_db.yaml": {"level": "group_db file", "nested": {"b": 2, "c": 2}},
        "vars/group_web.yaml": {"level": "group_web file", "items": [3]},
        "vars/camelot.yaml": {"level": "host file", "nested": {"c": 3}},
    }
    merged = config.vars_for("camelot", var_files)
    # The inline host var (site) beats everything; the host file beats every group;
    # web is camelot's later group, so its file and inline vars beat db's.
    assert merged == {
        "site": "dr",
        "level": "host file",
        "role": "web",
        "nested": {"a": 1, "b": 2, "c": 3},
        "items": [3],
    }
    frodo = config.vars_for("frodo", var_files)
    assert frodo["level"] == "group_web file"
    assert frodo["site"] == "hq"
    # Each call returns a fresh copy: one host's vars can never leak into another's.
    frodo["nested"]["a"] = 99
    assert config.vars_for("frodo", var_files)["nested"]["a"] == 1


def test_inline_group_vars_beat_the_group_file() -> None:
    config = RepoConfig.parse(BASE)
    merged = config.vars_for("frodo", {"vars/group_web.yaml": {"role": "file"}})
    assert merged["role"] == "web"


def test_vars_files() -> None:
    assert parse_vars_file(b"", "vars/frodo.yaml") == {}
    assert parse_vars_file(b"port: 80\nlist: [a]\n", "vars/frodo.yaml") == {
        "port": 80, "list": ["a"]}
    with pytest.raises(RepoConfigError, match=re.escape("vars/frodo.yaml:2: host: variable "
                                                        "name 'host' is reserved")):
        parse_vars_file(b"port: 80\nhost: x\n", "vars/frodo.yaml")
    with pytest.raises(RepoConfigError, match=re.escape("vars/x.yaml:1: must be a mapping")):
        parse_vars_file(b"- a\n", "vars/x.yaml")
    with pytest.raises(RepoConfigError, match=re.escape("vars/x.yaml:2: duplicate key 'a'")):
        parse_vars_file(b"a: 1\na: 2\n", "vars/x.yaml")


def test_errors_are_repo_errors() -> None:
    assert issubclass(RepoConfigError, BuildError)
    assert RepoConfigError.exit_code == ExitCode.REPO


# -- rejected configs: one line naming file and line, and the schema agrees ----------------

# (id, old text, new text, line needle, message, does the schema reject it too?)
BAD: list[tuple[str, str, str, str, str, bool]] = [
    ("typo-file-key", "    drift: report", "    on_chnage: x",
     "on_chnage", "files[1]: unknown key 'on_chnage' (did you mean 'on_change'?)", True),
    ("typo-top-key", "hosts:\n", "hots:\n", "hots:",
     "unknown key 'hots' (did you mean 'hosts'?)", True),
    ("typo-host-key", "    groups: [web]\n  camelot", "    group: [web]\n  camelot",
     "group: [web]", "hosts.frodo: unknown key 'group' (did you mean 'groups'?)", True),
    ("typo-command-key", "timeout: 120", "timout: 120", "timout",
     "files[1].on_change[1]: unknown key 'timout' (did you mean 'timeout'?)", True),
    ("bad-mode", '"0640"', '"0999"', "mode:",
     "files[1].mode: '0999' is not an octal mode", True),
    ("unquoted-mode", '"0640"', "0640", "mode:",
     'files[1].mode: must be a quoted string like "0644" (YAML read 416 as a number)', True),
    ("mode-too-long", '"0640"', '"00640"', "mode:",
     "files[1].mode: '00640' is not an octal mode", True),
    ("bad-drift", "drift: report", "drift: reprot", "drift:",
     "files[1].drift: 'reprot' is not one of revert, report, ignore (did you mean 'report'?)",
     True),
    ("timeout-zero", "timeout: 120", "timeout: 0", "timeout:",
     "files[1].on_change[1].timeout: 0 is outside 1..86400", True),
    ("timeout-bool", "timeout: 120", "timeout: yes", "timeout:",
     "files[1].on_change[1].timeout: must be an integer, not a boolean", True),
    ("retries-too-many", "retries: 5", "retries: 101", "health:",
     "files[1].health.retries: 101 is outside 0..100", True),
    ("blank-command", "validate: app --check {path}", "validate: ' '", "validate:",
     "files[1].validate: must not be empty", True),
    ("command-without-run", "{run: curl -fsS http://127.0.0.1/, retries: 5, delay: 2}",
     "{retries: 5}", "health:", "files[1].health: missing key 'run'", True),
    ("command-number", "validate: app --check {path}", "validate: 5", "validate:",
     "files[1].validate: must be a command string or a mapping with 'run', not a number",
     True),
    ("missing-src", "  - src: templates/motd.j2\n", "  - \n", "dest: /etc/motd",
     "files[0]: missing key 'src'", True),
    ("absolute-src", "src: templates/motd.j2", "src: /etc/motd", "src: /etc/motd",
     "files[0].src: '/etc/motd' is not a normalised relative path", True),
    ("dotdot-src", "src: templates/motd.j2", "src: ../secrets/key", "src: ../",
     "files[0].src: '../secrets/key' is not a normalised relative path", True),
    ("relative-dest", "dest: /etc/motd", "dest: etc/motd", "dest: etc/motd",
     "files[0].dest: 'etc/motd' is not an absolute path", True),
    ("unnormalised-dest", "dest: /etc/motd", "dest: /etc/../motd", "dest: /etc/..",
     "files[0].dest: '/etc/../motd' is not normalised", False),
    ("bad-owner", "owner: root", "owner: 'r o'", "owner:",
     "files[1].owner: 'r o' is not a user name", True),
    ("numeric-owner", "owner: root", "owner: 0", "owner:",
     "files[1].owner: must be a string, not a number", True),
    ("empty-selector", "    groups: [web]\n    mode", "    groups: []\n    mode", "groups: []",
     "files[1].groups: must name at least one group (leave the key out to mean all)", True),
    ("repeated-selector", "    groups: [web]\n    mode", "    groups: [web, web]\n    mode",
     "groups: [web, web]", "files[1].groups[1]: group 'web' is listed twice", True),
    ("unknown-host", "    groups: [web]\n    mode", "    hosts: [frdo]\n    mode",
     "hosts: [frdo]", "files[1].hosts[0]: unknown host 'frdo' (did you mean 'frodo'?)", False),
    ("unknown-group", "groups: [db, web]", "groups: [db, wbe]", "groups: [db, wbe]",
     "hosts.camelot.groups[1]: unknown group 'wbe' (did you mean 'web'?)", False),
    ("reserved-var", "site: dr", "hostvars: {}", "hostvars:",
     "hosts.camelot.vars.hostvars: variable name 'hostvars' is reserved", True),
    ("non-identifier-var", "site: hq", "my-site: hq", "my-site",
     "vars.my-site: variable name 'my-site' is not an identifier", True),
    ("bad-host-name", "  frodo:\n", "  frodo baggins:\n", "frodo baggins",
     "hosts.frodo baggins: 'frodo baggins' is not a valid host name", True),
    ("host-named-like-group-file", "  frodo:\n", "  group_web:\n", "group_web:",
     ("hosts.group_web: host name 'group_web' would clash with the group vars file "
     "vars/group_web.yaml"), True),
    ("no-hosts", ("hosts:\n  frodo:\n    groups: [web]\n  camelot:\n    groups: [db, web]\n"
     "    vars:\n      site: dr\n"), "hosts: {}\n", "hosts:",
     "hosts: must name at least one host", True),
    ("version-2", "version: 1", "version: 2", "version:",
     "version: unsupported version 2 (this builder reads version 1)", True),
    ("missing-version", "version: 1\n", "", "vars:", "missing key 'version'", True),
    ("vars-not-mapping", "vars:\n  site: hq\n", "vars: [site]\n", "vars:",
     "vars: must be a mapping of variables, not a list", True),
    ("duplicate-key", "    drift: report", "    drift: report\n    drift: ignore",
     "drift: ignore", "duplicate key 'drift' (first at line", False),
]


@pytest.mark.parametrize(("old", "new", "needle", "message", "schema_rejects"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_rejected(old: str, new: str, needle: str, message: str, schema_rejects: bool) -> None:
    text = edit(old, new)
    expected = f"gitops.yaml:{line_of(text, needle)}: {message}"
    with pytest.raises(RepoConfigError, match="^" + re.escape(expected)) as info:
        RepoConfig.parse(text)
    assert "\n" not in str(info.value)
    if schema_rejects:
        # Some cases (a duplicate key, a repeated top-level key) never reach a schema:
        # yaml.safe_load already collapsed them; those are marked False above.
        assert not schema_accepts(text), "the schema accepts what the classes reject"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "gitops.yaml:1: the file is empty"),
        ("version: 1\nhosts: [a\n", "gitops.yaml:3: invalid YAML"),
        ("version: 1\n  hosts: x\n", "gitops.yaml:2: invalid YAML"),
        ("- 1\n- 2\n", "gitops.yaml:1: must be a mapping, not a list"),
        ("version: 1\nhosts: {a: }\nfiles: /etc/motd\n",
         "gitops.yaml:3: files: must be a list, not a string"),
        ("version: 1\n---\nversion: 1\n", "gitops.yaml:2: invalid YAML"),
    ],
    ids=["empty", "unclosed-flow", "bad-indent", "list", "files-not-list", "two-documents"],
)
def test_rejected_yaml(text: str, message: str) -> None:
    with pytest.raises(RepoConfigError, match="^" + re.escape(message)):
        RepoConfig.parse(text)


def test_not_utf8() -> None:
    with pytest.raises(RepoConfigError, match=r"^gitops.yaml: not UTF-8 text"):
        RepoConfig.parse(b"version: 1\nhosts: {\xff: 1}\n")


GOOD_VARIANTS = [
    ("string-commands", BASE),
    ("command-lists", edit("validate: app --check {path}",
                           "validate:\n      - a {path}\n      - run: b {path}")),
    ("three-digit-mode", edit('"0640"', '"755"')),
    ("numeric-owner-string", edit("owner: root", "owner: '1000'")),
    ("hosts-and-groups", edit("    groups: [web]\n    mode", "    hosts: [frodo]\n"
                                                             "    groups: [db]\n    mode")),
    ("ignore-drift", edit("drift: report", "drift: ignore")),
    ("jinja-dest", edit("dest: /etc/motd", "dest: '{{ motd_path }}'")),
    ("null-group", edit("  db: {}", "  db:")),
]


@pytest.mark.parametrize("text", [v[1] for v in GOOD_VARIANTS],
                         ids=[v[0] for v in GOOD_VARIANTS])
def test_accepted_by_both(text: str) -> None:
    assert schema_accepts(text)
    RepoConfig.parse(text)


def test_file_selection() -> None:
    text = edit("    groups: [web]\n    mode", "    hosts: [frodo]\n    groups: [db]\n    mode")
    config = RepoConfig.parse(text)
    app = config.files[1]
    assert app.selects(config.hosts["frodo"])  # by name
    assert app.selects(config.hosts["camelot"])  # by group db


def test_jsonschema_is_not_a_runtime_dependency() -> None:
    code = ("import sys, bundler.config, bundler.render; "
            "sys.exit('jsonschema' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_yaml_set_is_refused_it_has_no_fixed_order() -> None:
    text = BASE.replace("  site: hq\n", "  site: hq\n  allowed: !!set {alpha, beta, gamma}\n", 1)
    with pytest.raises(RepoConfigError, match=r"^gitops\.yaml:4: a !!set has no fixed order"):
        RepoConfig.parse(text)


def test_nested_aliases_stay_shared_not_expanded() -> None:
    """A "billion laughs" in gitops.yaml: each level of nine-way aliases multiplies
    the values by nine if expanded (nine levels: 387 million); shared, a few dozen
    objects. Seven levels here, so that without the sharing this fails, not the host."""
    levels = ["  a0: &a0 [l, l, l, l, l, l, l, l, l]\n"] + [
        f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 7)]
    config = RepoConfig.parse(BASE.replace("  site: hq\n", "  site: hq\n" + "".join(levels), 1))
    for host in ("frodo", "camelot"):
        bomb = config.vars_for(host)["a6"]
        assert len(bomb) == 9
        assert all(part is bomb[0] for part in bomb)  # one object, referred to nine times
