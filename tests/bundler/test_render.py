"""render_fleet against real git: the example fleet, errors with file:line, parallelism.

The rendered example is also handed to the real tools that will judge it on a host:
``nginx -t`` for frodo's nginx config and ``systemd-analyze verify`` for camelot's units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import pytest
from fleetrepo import FleetRepo

from applier.manifest import Command
from bundler import render as render_module
from bundler.config import RepoConfig
from bundler.errors import (
    MissingSourceError,
    RepoConfigError,
    RepoError,
    TemplateRenderError,
)
from bundler.git import GitRepo
from bundler.render import BlobContent, Fleet, RenderedContent, render_fleet

# -- the tests ------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> FleetRepo:
    return FleetRepo.create(tmp_path / "repo")


def render(fleet: FleetRepo, rev: str = "HEAD", **kwargs: object) -> Fleet:
    return render_fleet(GitRepo(fleet.path), rev, fleet.subdir, **kwargs)  # type: ignore[arg-type]


def text_of(result: Fleet, host: str, path: str) -> str:
    entry = result.hosts[host].by_path()[path]
    content = result.contents[entry.sha256]
    assert isinstance(content, RenderedContent)
    return content.data.decode()


def add_file(fleet: FleetRepo, src: str, text: str, dest: str, extra: str = "") -> None:
    """Write ``src`` and list it first in gitops.yaml's files, to ``dest``."""
    fleet.write(src, text)
    fleet.replace("gitops.yaml", "files:\n", f"files:\n  - src: {src}\n    dest: {dest}\n{extra}")
    fleet.commit()


def line_in(fleet: FleetRepo, rel: str, needle: str) -> int:
    for number, line in enumerate(fleet.read(rel).splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {rel}")


def lay_out(result: Fleet, host: str, repo: GitRepo, root: Path) -> None:
    """Write one host's files under ``root`` as the applier would (modes included)."""
    with repo.blob_reader() as reader:
        for f in result.hosts[host].files:
            target = root / f.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for chunk in result.contents[f.sha256].chunks(reader):
                    out.write(chunk)
            target.chmod(f.mode)


FRODO = [
    "/etc/containers/systemd/app.container",
    "/etc/gitops/host-facts.conf",
    "/etc/motd",
    "/etc/nginx/conf.d/app.conf",
    "/etc/nginx/nginx.conf",
    "/etc/nginx/proxy_params",
]
CAMELOT = [
    "/etc/backup/exclude.txt",
    "/etc/cron.d/backup-prune",
    "/etc/gitops/host-facts.conf",
    "/etc/motd",
    "/etc/systemd/system/backup.service",
    "/etc/systemd/system/backup.timer",
    "/opt/backup/backup.sh",
]


# -- the example fleet ----------------------------------------------------------------------


def test_example_fleet(fleet: FleetRepo) -> None:
    result = render(fleet)
    assert result.config_path == "gitops.yaml"
    assert result.path == ""
    assert result.commit == fleet.git("rev-parse", "HEAD").strip()
    assert result.warnings == ()
    assert list(result.hosts) == ["camelot", "frodo"]
    assert [f.path for f in result.hosts["frodo"].files] == FRODO
    assert [f.path for f in result.hosts["camelot"].files] == CAMELOT

    app = text_of(result, "frodo", "/etc/nginx/conf.d/app.conf")
    assert "server 127.0.0.1:8081;" in app  # vars/frodo.yaml beats vars/group_web.yaml
    assert "server_name frodo.example.internal;" in app
    quadlet = text_of(result, "frodo", "/etc/containers/systemd/app.container")
    assert "PublishPort=127.0.0.1:8081:8080\n" in quadlet
    assert "Environment=APP_LOG_LEVEL=info\n" in quadlet

    files = result.hosts["frodo"].by_path()
    assert files["/etc/containers/systemd/app.container"].on_change == (
        Command("systemctl daemon-reload"), Command("systemctl restart app.service", timeout=120))
    assert files["/etc/containers/systemd/app.container"].health[0].run == (
        "curl -fsS --max-time 5 http://127.0.0.1:8081/healthz")
    assert files["/etc/nginx/nginx.conf"].validate == (Command("nginx -t -q -c {path}"),)
    assert files["/etc/motd"].drift == "report"
    assert result.hosts["camelot"].by_path()["/opt/backup/backup.sh"].mode == 0o755
    assert all(f.mode == 0o644 for f in result.hosts["frodo"].files)

    # Every content the hosts name is there, once, under its own digest.
    named = {f.sha256 for h in result.hosts.values() for f in h.files}
    assert set(result.contents) == named
    for digest, content in result.contents.items():
        if isinstance(content, RenderedContent):
            assert hashlib.sha256(content.data).hexdigest() == digest


def test_the_shared_file_differs_per_host(fleet: FleetRepo) -> None:
    result = render(fleet)
    frodo = text_of(result, "frodo", "/etc/gitops/host-facts.conf")
    camelot = text_of(result, "camelot", "/etc/gitops/host-facts.conf")
    assert frodo != camelot
    assert "hostname=frodo\nrole=web\nsite=hq\ngroups=web\n" in frodo
    assert "hostname=camelot\nrole=backup\nsite=dr\ngroups=backup\n" in camelot
    assert frodo.endswith("\n")  # keep_trailing_newline


def test_static_files_are_blob_references(fleet: FleetRepo) -> None:
    result = render(fleet)
    entry = result.hosts["frodo"].by_path()["/etc/nginx/proxy_params"]
    content = result.contents[entry.sha256]
    assert isinstance(content, BlobContent)
    data = (fleet.root / "files/nginx/proxy_params").read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert content.size == entry.size == len(data)


def test_big_static_file_is_hashed_by_streaming(fleet: FleetRepo) -> None:
    data = os.urandom(5 << 20) + b"end"
    fleet.write("files/big.bin", data)
    fleet.replace("gitops.yaml", "files:\n", "files:\n  - src: files/big.bin\n"
                  "    dest: /opt/data/big.bin\n    hosts: [camelot]\n")
    fleet.commit("big")
    result = render(fleet)
    entry = result.hosts["camelot"].by_path()["/opt/data/big.bin"]
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.size == len(data)
    content = result.contents[entry.sha256]
    assert isinstance(content, BlobContent)  # a reference, not 5 MiB in the Fleet
    with GitRepo(fleet.path).blob_reader() as reader:
        chunks = list(content.chunks(reader, chunk=1 << 20))
    assert max(len(c) for c in chunks) <= 1 << 20
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == entry.sha256


def test_executable_blob_defaults_to_0755(fleet: FleetRepo) -> None:
    fleet.write("files/tool.sh", "#!/bin/sh\n").chmod(0o755)
    fleet.replace("gitops.yaml", "files:\n", "files:\n  - src: files/tool.sh\n"
                  "    dest: /usr/local/bin/tool\n")
    fleet.commit()
    result = render(fleet)
    assert result.hosts["frodo"].by_path()["/usr/local/bin/tool"].mode == 0o755


# -- what is rendered: the commit, not the working tree ---------------------------------


def test_reads_the_commit_not_the_working_tree(fleet: FleetRepo) -> None:
    repo = GitRepo(fleet.path)
    before = render(fleet)
    fleet.replace("vars/frodo.yaml", "app_port: 8081", "app_port: 9999")
    fleet.replace("templates/motd.j2", "Managed", "UNCOMMITTED")
    fleet.write("templates/nginx/app.conf.j2", "{{ broken")
    fleet.write("templates/new.j2", "{{ undefined }}")
    assert repo.is_dirty()
    assert render(fleet) == before

    fleet.git("checkout", "--", "templates/nginx/app.conf.j2")
    fleet.commit("Move the app to 9999")
    after = render(fleet)
    assert "server 127.0.0.1:9999;" in text_of(after, "frodo", "/etc/nginx/conf.d/app.conf")
    assert "UNCOMMITTED" in text_of(after, "frodo", "/etc/motd")
    assert render(fleet, rev="HEAD~1") == before


def test_subpath(tmp_path: Path) -> None:
    fleet = FleetRepo.create(tmp_path / "repo", subdir="infra/prod")
    fleet.write("../../README.md", "not part of the fleet\n")
    fleet.commit()
    result = render(fleet)
    assert result.config_path == "infra/prod/gitops.yaml"
    assert result.path == "infra/prod"
    assert [f.path for f in result.hosts["frodo"].files] == FRODO
    with pytest.raises(RepoConfigError, match=r"^gitops\.yaml: not found in commit"):
        render_fleet(GitRepo(fleet.path), "HEAD", "")
    # Errors name the repo-relative path so the user can open the file.
    fleet.replace("templates/motd.j2", "{{ site }}", "{{ sitte }}")
    fleet.commit()
    with pytest.raises(TemplateRenderError,
                       match=r"^infra/prod/templates/motd\.j2:2: 'sitte' is undefined"):
        render(fleet)


def test_host_selection(fleet: FleetRepo) -> None:
    fleet.write("templates/peer.j2", "frodo serves on {{ hostvars.frodo.app_port }}\n")
    fleet.replace("gitops.yaml", "files:\n", "files:\n  - src: templates/peer.j2\n"
                  "    dest: /etc/peer\n    hosts: [camelot]\n")
    fleet.commit()
    result = render(fleet, hosts=["camelot"])
    assert list(result.hosts) == ["camelot"]
    # hostvars holds every host's merged vars, selected or not.
    assert text_of(result, "camelot", "/etc/peer") == "frodo serves on 8081\n"
    with pytest.raises(RepoConfigError, match=r"unknown host 'frdo' \(did you mean 'frodo'\?\)"):
        render(fleet, hosts=["frdo"])


def test_template_variables(fleet: FleetRepo) -> None:
    fleet.write("templates/ctx.j2", "{{ host }}|{{ groups }}|{{ hosts }}|{{ 'a b' | quote }}\n")
    fleet.replace("gitops.yaml", "files:\n", "files:\n  - src: templates/ctx.j2\n"
                  "    dest: /etc/ctx\n")
    fleet.commit()
    result = render(fleet)
    assert text_of(result, "camelot", "/etc/ctx") == (
        "camelot|['backup']|['frodo', 'camelot']|'a b'\n")


def test_dest_and_commands_are_templates(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "    dest: /etc/motd\n",
                  "    dest: /etc/motd.d/{{ host }}\n    on_change: echo {{ site }} {path}\n")
    fleet.commit()
    result = render(fleet)
    motd = result.hosts["camelot"].by_path()["/etc/motd.d/camelot"]
    assert motd.on_change == (Command("echo dr {path}"),)


def test_warnings(fleet: FleetRepo) -> None:
    fleet.write("vars/frodoo.yaml", "x: 1\n")
    fleet.replace("gitops.yaml", "groups:\n", "groups:\n  spare:\n")
    fleet.replace("gitops.yaml", "files:\n", "files:\n  - src: templates/motd.j2\n"
                  "    dest: /etc/spare\n    groups: [spare]\n")
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", "- src: templates/motd.j2")
    result = render(fleet)
    assert result.warnings == (
        "vars/frodoo.yaml: matches no host or group (did you mean 'vars/frodo.yaml'?)",
        f"gitops.yaml:{line}: files[0]: selects no host",
    )
    assert render(fleet, hosts=["frodo"]).warnings == result.warnings[:1]


def test_host_without_files(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "  camelot:\n", "  lonely:\n  camelot:\n")
    for path in ("/etc/gitops/host-facts.conf", "/etc/motd"):
        fleet.replace("gitops.yaml", f"    dest: {path}\n",
                      f"    dest: {path}\n    groups: [web, backup]\n")
    fleet.commit()
    result = render(fleet)
    assert result.hosts["lonely"].files == ()
    assert result.warnings == ("gitops.yaml: host 'lonely' gets no files",)


# -- errors: one line naming the file and line --------------------------------------------


def test_undefined_variable_names_template_line_and_host(fleet: FleetRepo) -> None:
    fleet.replace("templates/nginx/app.conf.j2", "server 127.0.0.1:{{ app_port }};",
                  "server 127.0.0.1:{{ upstream_port }};")
    fleet.commit()
    line = line_in(fleet, "templates/nginx/app.conf.j2", "upstream_port")
    with pytest.raises(TemplateRenderError) as info:
        render(fleet)
    assert str(info.value) == (
        f"templates/nginx/app.conf.j2:{line}: 'upstream_port' is undefined (host frodo)")


def test_undefined_inside_an_imported_macro(fleet: FleetRepo) -> None:
    fleet.replace("templates/_macros.j2", "(site {{ site }})", "(site {{ datacenter }})")
    fleet.commit()
    line = line_in(fleet, "templates/_macros.j2", "datacenter")
    with pytest.raises(TemplateRenderError,
                       match=rf"^templates/_macros\.j2:{line}: 'datacenter' is undefined"):
        render(fleet)


def test_undefined_attribute(fleet: FleetRepo) -> None:
    fleet.write("templates/motd.j2", "\n{{ hostvars.frodo.nope }}\n")
    fleet.commit()
    with pytest.raises(TemplateRenderError,
                       match=r"^templates/motd\.j2:2: 'dict object' has no attribute 'nope' "
                             r"\(host (camelot|frodo)\)$"):
        render(fleet)


@pytest.mark.parametrize("jobs", [1, 2])
def test_syntax_error_names_template_and_line(fleet: FleetRepo, jobs: int) -> None:
    # With workers, templates compile when a worker starts, before any host: the error
    # still comes from the host that renders the template, and names it.
    fleet.replace("templates/backup/backup.timer.j2", "OnCalendar={{ backup_schedule }}",
                  "OnCalendar={{ backup_schedule }")
    fleet.commit()
    line = line_in(fleet, "templates/backup/backup.timer.j2", "OnCalendar")
    with pytest.raises(TemplateRenderError,
                       match=rf"^templates/backup/backup\.timer\.j2:{line}: syntax error: "
                             r".* \(host camelot\)$"):
        render(fleet, jobs=jobs)


def test_syntax_error_in_an_included_template(fleet: FleetRepo) -> None:
    fleet.write("templates/_macros.j2", "{% macro managed() %}\n{% if %}\n{% endmacro %}\n")
    fleet.commit()
    with pytest.raises(TemplateRenderError, match=r"^templates/_macros\.j2:2: syntax error"):
        render(fleet)


def test_missing_include(fleet: FleetRepo) -> None:
    fleet.replace("templates/motd.j2", "\n", "\n{% include 'templates/banner.j2' %}\n")
    fleet.commit()
    with pytest.raises(TemplateRenderError,
                       match=r"^templates/motd\.j2:2: template 'templates/banner\.j2' not "
                             r"found \(host (camelot|frodo)\)$"):
        render(fleet)


def test_include_from_the_commit(fleet: FleetRepo) -> None:
    fleet.write("templates/banner.j2", "*** {{ host }} ***\n")
    fleet.replace("templates/motd.j2", "\n", "\n{% include 'templates/banner.j2' %}\n")
    fleet.commit()
    assert "*** frodo ***\n" in text_of(render(fleet), "frodo", "/etc/motd")


def test_templates_cannot_change_shared_data(fleet: FleetRepo) -> None:
    fleet.write("templates/motd.j2", "{{ ntp_servers.append('evil') }}\n")
    fleet.commit()
    with pytest.raises(TemplateRenderError, match=r"^templates/motd\.j2:1: .*append"):
        render(fleet)


def test_template_must_be_utf8(fleet: FleetRepo) -> None:
    fleet.write("templates/motd.j2", b"caf\xe9\n")
    fleet.commit()
    with pytest.raises(TemplateRenderError, match=r"^templates/motd\.j2: not UTF-8"):
        render(fleet)


def test_config_typo_names_file_line_and_suggestion(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "    on_change: systemctl daemon-reload\n",
                  "    on_chnage: systemctl daemon-reload\n")
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", "on_chnage")
    with pytest.raises(RepoConfigError) as info:
        render(fleet)
    assert re.fullmatch(rf"gitops\.yaml:{line}: files\[\d+\]: unknown key 'on_chnage' "
                        r"\(did you mean 'on_change'\?\)", str(info.value))


def test_bad_mode(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", 'mode: "0755"', 'mode: "0999"')
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", "0999")
    with pytest.raises(RepoConfigError,
                       match=rf"^gitops\.yaml:{line}: files\[6\]\.mode: '0999' is not an "
                             "octal mode"):
        render(fleet)


def test_bad_vars_file(fleet: FleetRepo) -> None:
    fleet.write("vars/camelot.yaml", "retention_days: 30\nretention_days: 31\n")
    fleet.commit()
    with pytest.raises(RepoConfigError,
                       match=r"^vars/camelot\.yaml:2: duplicate key 'retention_days'"):
        render(fleet)


def test_missing_src_names_the_config_line(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "src: templates/motd.j2", "src: templates/mtod.j2")
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", "mtod")
    with pytest.raises(MissingSourceError,
                       match=rf"^gitops\.yaml:{line}: files\[1\]\.src: templates/mtod\.j2 does "
                             r"not exist in commit [0-9a-f]{12} \(did you mean "
                             r"'templates/motd\.j2'\?\)$"):
        render(fleet)


def test_src_directory(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "src: files/backup/exclude.txt", "src: files/backup")
    fleet.commit()
    with pytest.raises(MissingSourceError, match=r"'files/backup' is a directory"):
        render(fleet)


def test_referenced_symlink_is_rejected_unreferenced_is_fine(fleet: FleetRepo) -> None:
    os.symlink("motd.j2", fleet.root / "templates/issue.j2")
    fleet.commit()
    render(fleet)  # nobody uses it yet
    fleet.replace("gitops.yaml", "src: templates/motd.j2", "src: templates/issue.j2")
    fleet.commit()
    with pytest.raises(MissingSourceError, match=r"files\[1\]\.src: templates/issue\.j2 is a "
                                                 r"symlink in commit"):
        render(fleet)


def test_a_file_name_that_is_not_utf8_does_not_stop_the_build(
        fleet: FleetRepo, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing in gitops.yaml or a template can name it (they are UTF-8 text)."""
    (fleet.root / "files").mkdir(exist_ok=True)
    (fleet.root / "files").joinpath(os.fsdecode(b"caf\xe9-latin1.txt")).write_bytes(b"x\n")
    fleet.commit()
    result = render(fleet)
    assert "frodo" in result.hosts
    assert "name is not UTF-8" in caplog.text


def test_duplicate_dest(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "    dest: /etc/backup/exclude.txt\n",
                  "    dest: /etc/motd\n")
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", "files/backup/exclude.txt") + 1
    first = line_in(fleet, "gitops.yaml", "dest: /etc/motd")
    with pytest.raises(RepoConfigError) as info:
        render(fleet)
    assert str(info.value) == (f"gitops.yaml:{line}: files[7].dest: /etc/motd for host camelot "
                               f"is also the dest of files[1] (line {first})")


def test_file_and_directory_conflict(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "    dest: /etc/backup/exclude.txt\n",
                  "    dest: /etc/motd/exclude.txt\n")
    fleet.commit()
    with pytest.raises(RepoConfigError, match="'/etc/motd' is both a file and a directory"):
        render(fleet)


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("/etc/{{ nope }}", r"files\[1\]\.dest: 'nope' is undefined \(host (camelot|frodo)\)$"),
        ("/etc/{{ host", r"files\[1\]\.dest: syntax error: .*\(host (camelot|frodo)\)$"),
        ("'{{ host }}/motd'",
         r"files\[1\]\.dest: '(camelot|frodo)/motd' \(host \w+\) is not an absolute"),
        ("'/etc/{{ \"\" }}'", r"files\[1\]\.dest: '/etc/' \(host \w+\) does not name a file$"),
        ("/etc/cafe\u0301.conf",  # a literal dest: checked with the config, no host yet
         r"files\[1\]\.dest: '/etc/cafe\u0301.conf' is not in Unicode NFC form$"),
        ("/etc/gitops-apply/allowed_signers",
         (r"files\[1\]\.dest: '/etc/gitops-apply/allowed_signers' \(host \w+\) is or holds "
          r"the applier's own config and state \(/etc/gitops-apply\): every host refuses it$")),
        ("/var/lib", (r"files\[1\]\.dest: '/var/lib' \(host \w+\) is or holds the applier's "
                      r"own config and state \(/var/lib/gitops-apply\)")),
    ],
    ids=["undefined", "syntax", "relative", "directory", "not-nfc", "protected", "holds-state"],
)
def test_bad_templated_dest(fleet: FleetRepo, dest: str, message: str) -> None:
    fleet.replace("gitops.yaml", "dest: /etc/motd", f"dest: {dest}")
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", "dest: " + dest)
    with pytest.raises(RepoError, match=rf"^gitops\.yaml:{line}: {message}"):
        render(fleet)


def test_a_hint_found_before_a_failure_is_not_lost_with_it(
        fleet: FleetRepo, caplog: pytest.LogCaptureFixture) -> None:
    """vars/frodo.yml (not .yaml) matches no host, which is why 'greeting' is
    undefined: the hint must reach the operator along with the error."""
    fleet.write("vars/frodo.yml", "greeting: hello\n")
    add_file(fleet, "templates/greet.j2", "{{ greeting }}\n", "/etc/greeting",
             "    hosts: [frodo]\n")
    with pytest.raises(TemplateRenderError, match="'greeting' is undefined"):
        render(fleet)
    assert "vars/frodo.yml: matches no host or group (did you mean 'vars/frodo.yaml'?)" \
        in caplog.text


def test_a_template_that_renders_a_lone_surrogate_is_a_render_error(fleet: FleetRepo) -> None:
    add_file(fleet, "templates/s.j2", "a {{ '\\udcff' }}\n", "/etc/s")
    with pytest.raises(TemplateRenderError, match=r"^templates/s\.j2: renders text that is "
                       r"not valid Unicode \(U\+DCFF at character 2; host \w+\)$"):
        render(fleet)


def test_an_integer_too_long_to_convert_is_a_config_error(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "files:\n", f"x: {'9' * 5000}\nfiles:\n")
    fleet.commit()
    with pytest.raises(RepoConfigError, match=r"^gitops\.yaml: invalid YAML value: "):
        render(fleet)


def test_undefined_in_a_command(fleet: FleetRepo) -> None:
    fleet.replace("gitops.yaml", "systemctl restart {{ app_name }}.service",
                  "systemctl restart {{ app }}.service")
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", "{{ app }}")
    with pytest.raises(TemplateRenderError,
                       match=rf"^gitops\.yaml:{line}: files\[5\]\.on_change\[1\]: 'app' is "
                             r"undefined \(host frodo\)$"):
        render(fleet)


@pytest.mark.parametrize("run", ["grep -q 'hello {path}", "echo {{ '\"' }}unbalanced"],
                         ids=["as-written", "as-rendered"])
def test_a_command_the_host_cannot_split_fails_the_build(fleet: FleetRepo, run: str) -> None:
    """The host splits each command with shlex; one it cannot split must fail here, not
    after the stick crossed the air gap."""
    fleet.replace("gitops.yaml", "systemctl restart {{ app_name }}.service", run)
    fleet.commit()
    line = line_in(fleet, "gitops.yaml", run)
    with pytest.raises(RepoConfigError,
                       match=rf"^gitops\.yaml:{line}: files\[5\]\.on_change\[1\]: .* \(host "
                             r"frodo\) cannot be split into arguments: no closing quotation$"):
        render(fleet)


def test_the_quote_filter_takes_numbers(fleet: FleetRepo) -> None:
    add_file(fleet, "templates/q.j2", "{{ 8080 | quote }} {{ 'a b' | quote }}\n", "/etc/q")
    assert text_of(render(fleet), "camelot", "/etc/q") == "8080 'a b'\n"


# -- many hosts, several processes --------------------------------------------------------


def many_hosts(fleet: FleetRepo, count: int) -> None:
    extra = "".join(f"  web{i:03d}:\n    groups: [web]\n    vars:\n      server_name: "
                    f"web{i:03d}.example.internal\n      app_port: {9000 + i % 7}\n"
                    for i in range(count))
    fleet.replace("gitops.yaml", "  camelot:\n", extra + "  camelot:\n")
    fleet.commit(f"{count} more web hosts")


def test_parallel_rendering_equals_serial(fleet: FleetRepo) -> None:
    many_hosts(fleet, 40)
    done: list[int] = []
    serial = render(fleet, jobs=1)
    parallel = render(fleet, jobs=2, progress=done.append)
    assert parallel == serial
    assert len(serial.hosts) == 42
    assert sum(done) == 42
    assert len(done) > 1  # progress came per chunk, not once at the end
    # Hosts that share a port share the rendered bytes: stored once.
    assert len(serial.contents) < sum(len(h.files) for h in serial.hosts.values())


def test_hosts_share_an_entry_only_when_it_is_equal(fleet: FleetRepo) -> None:
    # One object for every host it is equal for, so a worker's chunk pickles it once
    # (the parent unpickled all 110,000 entries of a 200-host fleet, one by one).
    many_hosts(fleet, 8)
    fleet.replace("gitops.yaml", "    on_change: systemctl reload nginx\n\n  # The app",
                  "    on_change: echo {{ app_port }}\n\n  # The app")
    fleet.commit()
    serial = render(fleet, jobs=1)
    params = {name: host.by_path()["/etc/nginx/proxy_params"]
              for name, host in serial.hosts.items() if name != "camelot"}
    assert params["web000"] is params["web007"]  # both on port 9000
    assert params["web000"] is not params["web001"]
    assert params["web001"].on_change == (Command("echo 9001"),)
    assert params["frodo"].on_change == (Command("echo 8081"),)
    assert render(fleet, jobs=2) == serial


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_static_file_with_a_per_host_dest_lands_at_each_hosts_path(
        fleet: FleetRepo, jobs: int) -> None:
    # A static file is one entry for every host only while its dest is plain text.
    many_hosts(fleet, 3)
    fleet.replace("gitops.yaml", "    dest: /etc/nginx/proxy_params\n",
                  "    dest: /etc/nginx/{{ host }}.params\n")
    fleet.commit()
    result = render(fleet, jobs=jobs)
    for name in ("frodo", "web000", "web002"):
        assert f"/etc/nginx/{name}.params" in result.hosts[name].by_path()


def test_workers_started_beside_another_thread_render_the_same(fleet: FleetRepo) -> None:
    # With no other thread the workers are forked; a live thread (a progress bar's
    # monitor, a caller's) makes render_fleet use forkserver instead.
    many_hosts(fleet, 20)
    forked = render(fleet, jobs=2)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        assert render(fleet, jobs=2) == forked == render(fleet, jobs=1)
    finally:
        stop.set()
        other.join()


def test_default_jobs_uses_processes_for_many_hosts(fleet: FleetRepo) -> None:
    many_hosts(fleet, 20)
    assert render(fleet) == render(fleet, jobs=1)


def test_the_workers_compile_each_template_once_between_them(
        fleet: FleetRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each worker compiles a share and loads the rest as the others compiled it:
    # compiling every template in every worker took longer than the parent's reading.
    many_hosts(fleet, 20)
    log = tmp_path / "compiled"
    compile_source = jinja2.Environment.compile

    def logged(env: jinja2.Environment, source: str, name: str | None = None,
               *args: Any, **kwargs: Any) -> Any:
        if name is not None:  # a template file, not a dest or command string
            with log.open("a") as f:  # from whichever (forked) process compiles
                f.write(f"{os.getpid()} {name}\n")
        return compile_source(env, source, name, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "compile", logged)
    assert render(fleet, jobs=2) == render(fleet, jobs=1)
    lines = log.read_text().split("\n")[:-1]
    here = [n for p, n in map(str.split, lines) if p == str(os.getpid())]
    there = [n for p, n in map(str.split, lines) if p != str(os.getpid())]
    counts = Counter(there)
    assert set(counts) == set(here)
    # A template only imported is compiled where a host first renders it: no file in
    # gitops.yaml names it as its src, so no worker's share holds it.
    imported = {"templates/_macros.j2"}
    assert {n: c for n, c in counts.items() if n not in imported} == dict.fromkeys(
        set(here) - imported, 1)
    assert len({p for p, _ in map(str.split, lines)}) == 3  # both workers compiled some


def test_bytecode_compiled_from_another_source_is_not_used(fleet: FleetRepo,
                                                           tmp_path: Path) -> None:
    # What one renderer compiled reaches another as bytes; Jinja's checksum of the
    # source decides whether it is used, never the template's name alone.
    many_hosts(fleet, 20)
    before = render(fleet, jobs=1)
    old = _compiled_at(fleet, "HEAD", tmp_path)
    fleet.replace("templates/nginx/app.conf.j2", "{{ server_name }}", "{{ server_name }}.x")
    after = fleet.commit()
    repo = GitRepo(fleet.path)
    job = _job(repo, after, tmp_path)
    renderer = render_module._Renderer(job)
    renderer.use(render_module._Data(
        hostvars={h: job.config.vars_for(h, _vars(repo, job)) for h in job.config.hosts},
        static=_static(repo, job), compiled=render_module._Compiled(bytecode=old.bytecode)))
    try:
        result = renderer.host("web003")
    finally:
        renderer.release()
    path, offset, size = result.rendered[
        result.entry.by_path()["/etc/nginx/conf.d/app.conf"].sha256]
    text = render_module.Spool(path).read(offset, size)
    assert b"web003.example.internal.x" in text
    assert text_of(before, "web003", "/etc/nginx/conf.d/app.conf") != text.decode()


def _job(repo: GitRepo, rev: str, spool_dir: Path) -> render_module._Job:
    commit = repo.resolve(rev)
    tree = repo.list_tree(commit, "")
    with repo.blob_reader() as reader:
        config = RepoConfig.parse(
            render_module._read_config(tree, reader, "gitops.yaml", commit), "gitops.yaml")
    return render_module._Job(repo=repo, commit=commit, prefix="", tree=tree, config=config,
                              spool_dir=str(spool_dir))


def _vars(repo: GitRepo, job: render_module._Job) -> dict[str, dict[str, object]]:
    with repo.blob_reader() as reader:
        return render_module._read_var_files(job.config, job.tree, reader, "", [])


def _static(repo: GitRepo, job: render_module._Job) -> dict[str, tuple[str, int]]:
    with repo.blob_reader() as reader:
        return {e.oid: reader.hash(e.oid) for path, e in job.tree.items()
                if path.startswith("files/") and e.is_regular}


def _compiled_at(fleet: FleetRepo, rev: str, spool_dir: Path) -> render_module._Compiled:
    job = _job(GitRepo(fleet.path), rev, spool_dir)
    renderer = render_module._Renderer(job)
    try:
        return renderer.compile(sorted({s.src for s in job.config.files if s.is_template}))
    finally:
        renderer.release()


def test_errors_cross_the_process_boundary(fleet: FleetRepo) -> None:
    many_hosts(fleet, 20)
    fleet.replace("templates/nginx/app.conf.j2", "{{ server_name }}", "{{ server_nam }}")
    fleet.commit()
    with pytest.raises(TemplateRenderError, match=r"^templates/nginx/app\.conf\.j2:\d+: "
                                                  "'server_nam' is undefined"):
        render(fleet, jobs=2)


def test_a_fleet_whose_entry_has_no_matching_content_cannot_be_made(fleet: FleetRepo) -> None:
    good = render(fleet)
    entry = good.hosts["frodo"].files[0]
    for contents in ({d: c for d, c in good.contents.items() if d != entry.sha256},
                     {**good.contents, entry.sha256: dataclasses.replace(
                         good.contents[entry.sha256], size=entry.size + 1)}):
        with pytest.raises(RepoError, match=rf"^internal: frodo:{entry.path} has no "
                                            "matching content$"):
            dataclasses.replace(good, contents=contents)


def test_jobs_must_be_positive(fleet: FleetRepo) -> None:
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        render(fleet, jobs=0)


# -- the real tools accept what was rendered ----------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pytest.skip(f"{name} is not installed (the CI script installs it)")
    return path


def test_nginx_accepts_frodos_config(fleet: FleetRepo, tmp_path: Path) -> None:
    nginx = _tool("nginx")
    result = render(fleet)
    root = tmp_path / "root"
    lay_out(result, "frodo", GitRepo(fleet.path), root)
    # The rendered files are checked as they are. Only what `nginx -t` writes besides
    # them is pointed into the root: the pid file (-g, as nginx.conf leaves it at the
    # compiled-in default) and the temp dirs nginx insists on creating (a drop-in).
    temp = root / "var/lib/nginx"
    temp.mkdir(parents=True)
    (root / "etc/nginx/conf.d/zz-test-paths.conf").write_text("".join(
        f"{kind}_temp_path {temp / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")))
    argv = [nginx, "-e", "stderr", "-g", f"pid {root}/nginx.pid;",
            "-c", str(root / "etc/nginx/nginx.conf")]
    # `nginx -t` binds its listen sockets: in a private network namespace (as root),
    # port 80 is free whatever runs on this machine.
    if os.geteuid() == 0 and subprocess.run(["unshare", "--net", "true"],
                                            capture_output=True, check=False).returncode == 0:
        argv = ["unshare", "--net", *argv]
    check = subprocess.run([*argv, "-T"], capture_output=True, text=True, check=False)
    if check.returncode != 0 and "bind() to 0.0.0.0:80 failed (13" in check.stderr:
        pytest.skip("nginx -t must bind port 80: run as root (as CI does)")
    assert check.returncode == 0, check.stderr
    assert "test is successful" in check.stderr
    # -T dumps what was loaded: the site and the relative include were really read.
    assert "server_name frodo.example.internal;" in check.stdout
    assert "proxy_set_header X-Real-IP $remote_addr;" in check.stdout

    # And a broken site is refused, so the check above is not vacuous.
    site = root / "etc/nginx/conf.d/app.conf"
    site.write_text(site.read_text().replace("proxy_pass http://app;", "proxy_pass;"))
    broken = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    assert broken.returncode != 0
    assert "app.conf" in broken.stderr


def test_systemd_accepts_camelots_units(fleet: FleetRepo, tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                  if (p / "sysinit.target").exists()), None)
    if units is None:
        pytest.skip("systemd's own units (sysinit.target...) are not installed")
    result = render(fleet)
    root = tmp_path / "root"
    lay_out(result, "camelot", GitRepo(fleet.path), root)
    # --root makes systemd resolve every path, ExecStart= included, inside the root;
    # the stock targets that timers and services depend on are copied in beside ours.
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    argv = [analyze, "verify", f"--root={root}", "/etc/systemd/system/backup.service",
            "/etc/systemd/system/backup.timer"]
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    ok = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    assert ok.returncode == 0, ok.stderr
    # Warnings (an unknown key, a bad value) do not fail verify: fail on them here.
    assert "backup." not in ok.stdout + ok.stderr, ok.stderr

    (root / "opt/backup/backup.sh").chmod(0o644)
    broken = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    assert broken.returncode != 0
    assert "/opt/backup/backup.sh is not executable" in broken.stderr


def test_backup_script_and_cron_file(fleet: FleetRepo, tmp_path: Path) -> None:
    result = render(fleet)
    root = tmp_path / "root"
    lay_out(result, "camelot", GitRepo(fleet.path), root)
    script = root / "opt/backup/backup.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert script.read_text().startswith("#!/bin/sh\n")
    assert os.access(script, os.X_OK)
    cron = (root / "etc/cron.d/backup-prune").read_text()
    # cron ignores a last line without a newline, and runs root's job as `root`.
    assert cron.endswith("\n")
    assert re.search(r"^30 4 \* \* \* root find /srv/backup .* -mtime \+30 -delete$", cron,
                     re.MULTILINE)


def test_included_symlink_is_rejected(fleet: FleetRepo) -> None:
    os.symlink("_macros.j2", fleet.root / "templates/_alias.j2")
    fleet.write("templates/motd.j2", '{% import "templates/_alias.j2" as m %}\n')
    fleet.commit()
    with pytest.raises(TemplateRenderError, match=r"^templates/motd\.j2:1: template "
                                                  r"'templates/_alias\.j2': templates/_alias\.j2 "
                                                  r"is a symlink \(host \w+\)$"):
        render(fleet)


def test_submodule_src_is_rejected(fleet: FleetRepo) -> None:
    head = fleet.git("rev-parse", "HEAD").strip()
    fleet.git("update-index", "--add", "--cacheinfo", f"160000,{head},vendor/tool")
    fleet.replace("gitops.yaml", "src: files/backup/exclude.txt", "src: vendor/tool")
    fleet.git("add", "gitops.yaml")
    fleet.git("commit", "--quiet", "-m", "submodule")
    with pytest.raises(MissingSourceError, match=r"files\[7\]\.src: vendor/tool is a submodule"):
        render(fleet)
