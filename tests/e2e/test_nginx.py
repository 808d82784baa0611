"""A real nginx on a loopback port, configured by bundles through the real CLI.

Issue 4's acceptance scenario: v1 serves page A; v2 serves B after its on_change
reload; v3 fails ``nginx -t`` (a ``check``, run on the live tree with its includes)
and is refused before any reload, so nginx still serves B (exit 5); v4 passes
``nginx -t`` but proxies to a dead upstream, so its health check fails after the
reload and the applier rolls back and reloads again: nginx serves B (exit 6).

Everything nginx touches lives under the test's root: config (``-p <root>/etc/nginx/``),
pid file, logs and temp dirs. It listens on 127.0.0.1 only and is stopped by a
finalizer whatever happens. The master runs in the foreground (``daemon off``) as the
test's child; ``nginx -s reload`` finds it through the pid file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from applier.apply import init_host
from applier.errors import ExitCode
from applier.manifest import Command

from conftest import require_tool
from factory import BundleSpec, FileSpec, KeyPair, snapshot, write_allowed_signers

STATE = "var/lib/gitops-apply"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int) -> tuple[int, bytes]:
    """GET / on the loopback port, never through a proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/", timeout=3) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def serves(port: int, body: bytes, timeout: float = 15) -> bool:
    """Poll until nginx answers 200 with ``body`` (a reload takes effect asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fetch(port) == (200, body):
            return True
        time.sleep(0.05)
    return False


class Nginx:
    """Paths and config text for one nginx instance under a test root."""

    def __init__(self, binary: str, root: Path, port: int) -> None:
        self.binary = binary
        self.root = root
        self.port = port
        self.prefix = root / "etc/nginx"
        self.pid_file = root / "run/nginx.pid"
        self.error_log = root / "var/log/nginx/error.log"

    def main_conf(self) -> bytes:
        cache = self.root / "var/cache/nginx"
        # As root the workers would switch to "nobody", who cannot enter pytest's 0700
        # temp dirs; the config is the test's own, so they may stay root.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return (f"{user}worker_processes 1;\n"
                f"pid {self.pid_file};\n"
                f"error_log {self.error_log} notice;\n"
                "events { worker_connections 64; }\n"
                "http {\n"
                "    access_log off;\n"
                f"    client_body_temp_path {cache}/body;\n"
                f"    proxy_temp_path {cache}/proxy;\n"
                f"    fastcgi_temp_path {cache}/fastcgi;\n"
                f"    uwsgi_temp_path {cache}/uwsgi;\n"
                f"    scgi_temp_path {cache}/scgi;\n"
                "    include conf.d/*.conf;\n"
                "}\n").encode()

    def site(self, location: str) -> bytes:
        return (f"server {{\n    listen 127.0.0.1:{self.port};\n"
                f"    location / {{ {location} }}\n}}\n").encode()

    def args(self) -> str:
        return "-p {root}/etc/nginx/ -c nginx.conf -e {root}/var/log/nginx/error.log"

    def reloads(self) -> int:
        """How many reloads the master has received (the error log at notice level)."""
        if not self.error_log.exists():
            return 0
        return self.error_log.read_text(errors="replace").count("signal 1 (SIGHUP) received")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    binary = require_tool("nginx")
    root = tmp_path / "web"
    n = Nginx(binary, root, free_port())
    for d in ("etc/nginx/conf.d", "run", "var/log/nginx", "var/cache/nginx"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # The distribution's config, before any bundle: the host already runs nginx.
    (n.prefix / "nginx.conf").write_bytes(n.main_conf())
    (n.prefix / "conf.d/site.conf").write_bytes(n.site('return 200 "default\\n";'))
    proc = subprocess.Popen([binary, "-p", f"{n.prefix}/", "-c", "nginx.conf",
                             "-e", str(n.error_log), "-g", "daemon off;"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        if not serves(n.port, b"default\n"):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"nginx did not start: {err.decode(errors='replace')}")
        yield n
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def gitops(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gitops-apply", "--root", str(root), *args], capture_output=True,
                          text=True, check=False, timeout=120)


def test_nginx_reload_check_and_health_rollback(
        nginx: Nginx, tmp_path: Path, signing_key: KeyPair) -> None:
    n = nginx
    root = n.root
    init_host(root, "web", write_allowed_signers(tmp_path / "allowed_signers", signing_key))
    check = f"{n.binary} -t -q {n.args()}"
    # Reload, then give the master a moment to swap workers so the health check
    # (and the test) talk to the new configuration, not an old worker.
    reload = (f"{n.binary} -s reload {n.args()}", "sleep 1")
    health_cmd = ("curl -fsS --max-time 2 " if _has_curl() else
                  "python3 -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1], "
                  "timeout=2)' ") + f"http://127.0.0.1:{n.port}/"
    health = Command(health_cmd, timeout=10, retries=2, delay=1)

    def bundle(seq: int, location: str) -> Path:
        def f(content: bytes) -> FileSpec:
            return FileSpec(content, check=(check,), on_change=reload, health=(health,))
        return BundleSpec({"web": {"/etc/nginx/nginx.conf": f(n.main_conf()),
                                   "/etc/nginx/conf.d/site.conf": f(n.site(location))}},
                          sequence=seq, commit=f"{seq:040x}").write(tmp_path / f"v{seq}.tar",
                                                                    signing_key)

    # v1: page A, through a real reload of the running master.
    r = gitops(root, "apply", str(bundle(1, 'return 200 "page A\\n";')))
    assert r.returncode == 0, r.stderr
    assert serves(n.port, b"page A\n")

    # v2: page B.
    r = gitops(root, "apply", str(bundle(2, 'return 200 "page B\\n";')))
    assert r.returncode == 0, r.stderr
    assert serves(n.port, b"page B\n")
    v2_files = snapshot(root / "etc/nginx")
    reloads = n.reloads()
    assert reloads >= 2

    # v3: a directive nginx does not know. Each file alone looks fine; `nginx -t` on the
    # live tree (after the swap) fails, the old files return, nginx is never told.
    r = gitops(root, "apply", str(bundle(3, 'return 200 "page C\\n"; no_such_directive on;')))
    assert r.returncode == ExitCode.VALIDATION, r.stderr
    assert "no_such_directive" in r.stderr or "nginx -t" in r.stderr, r.stderr
    assert "before any reload" in r.stderr
    assert n.reloads() == reloads
    assert snapshot(root / "etc/nginx") == v2_files
    assert fetch(n.port) == (200, b"page B\n")

    # v4: valid config, but the upstream is dead, so the page is a 502 after the reload:
    # the health check fails, the applier restores v2 and reloads again.
    dead = free_port()
    r = gitops(root, "apply", str(bundle(4, f"proxy_pass http://127.0.0.1:{dead};")))
    assert r.returncode == ExitCode.HEALTH, r.stderr
    assert "health check" in r.stderr
    assert "rolled back" in r.stderr
    assert n.reloads() == reloads + 2  # the new config, then the old one again
    assert snapshot(root / "etc/nginx") == v2_files
    assert serves(n.port, b"page B\n")

    status = json.loads(gitops(root, "status", "--json").stdout)
    assert status["current"]["sequence"] == 2
    history = json.loads(gitops(root, "history", "--json").stdout)
    last = history[-1]
    assert last["result"].startswith("failed")
    assert [c["run"] for c in last["commands"]][-2:] == list(reload)

    # Both failures are remembered: refused without --force (POLICY), nginx untouched.
    r = gitops(root, "apply", str(tmp_path / "v4.tar"))
    assert r.returncode == ExitCode.POLICY, r.stderr
    assert n.reloads() == reloads + 2
    assert fetch(n.port) == (200, b"page B\n")


def _has_curl() -> bool:
    """curl when the machine has it (CI installs it); else Python's urllib does the GET."""
    if os.environ.get("CI") == "true":
        require_tool("curl")
    try:
        subprocess.run(["curl", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True
