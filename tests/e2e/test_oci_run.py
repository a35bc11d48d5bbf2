"""``ferry vm run oci://REF`` end to end: images built here, pushed to a local registry,
run as VMs through the CLI (pull, boot until ready, snapshot, resume), then checked from
outside (published ports), from the guest (``vm exec``) and through ``vm logs``.

Each image's first run is a TCG boot (seconds); the second run of the same image and
overrides resumes the cached snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.hostconfig import HostConfig
from ferry.testing.oci_images import build_and_push
from ferry.testing.registry import local_registry
from ferry.testing.site import holder_pids
from ferry.vm.registry import VMPaths

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]
CLI_TIMEOUT_S = 300.0
SHARED = HostConfig.from_environ(os.environ).cache_root
# The process of the image: the one whose root is the image's mount.
IMAGE_PID = ('for p in /proc/[0-9]*; do [ "$(readlink $p/root)" = /oci ] && '
             'echo ${p#/proc/} && break; done')


@dataclass(frozen=True)
class Env:
    root: Path
    cache: Path
    env: dict[str, str]
    httpd: str
    redis: str

    def ferry(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*FERRY, *args], env=self.env, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_S, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"ferry {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def run(self, *args: str) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.ferry("vm", "run", "--detach", "--json",
                                                       *args).stdout)
        return report

    def sh(self, vm: str, script: str) -> str:
        return self.ferry("vm", "exec", vm, "--", "sh", "-c", script).stdout


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="foci-"))  # short: UNIX socket paths
    cache = root / "cache"
    cache.mkdir()
    # Debian packages, the kernel and the agent come from the host's cache (content-keyed,
    # written atomically); pulled images, guests and snapshots stay in this test's cache.
    for shared in ("debs", "agent"):
        (SHARED / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(SHARED / shared)
    paths = VMPaths(root / "run", root / "state")
    environ = {**os.environ, "FERRY_RUN_DIR": str(paths.run_root),
               "FERRY_STATE_DIR": str(paths.state_root), "FERRY_CACHE_DIR": str(cache)}
    try:
        with local_registry(root / "registry") as reg:
            yield Env(root, cache, environ,
                      httpd=build_and_push("httpd", reg.address, cache_dir=SHARED,
                                           work_dir=root),
                      redis=build_and_push("redis", reg.address, cache_dir=SHARED,
                                           work_dir=root))
    finally:
        for pid in holder_pids(paths):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        subprocess.run([sys.executable, "-c",
                        "import asyncio,sys; from pathlib import Path; "
                        "from ferry.vm.registry import VMPaths, cleanup_leftovers; "
                        "asyncio.run(cleanup_leftovers(VMPaths(Path(sys.argv[1]), "
                        "Path(sys.argv[2]))))", str(paths.run_root), str(paths.state_root)],
                       check=False, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        body: bytes = resp.read()
        return body


def test_httpd_image_runs_with_its_config_and_overrides(env: Env) -> None:
    port = free_port()
    env.run(f"oci://{env.httpd}", "--name", "web1", "-p", f"127.0.0.1:{port}:8080",
            "-e", "GREETING=override", "-e", "ADDED=1")
    try:
        assert http_get(port) == b"hello from an OCI image\n"
        pid = env.sh("web1", IMAGE_PID).strip()
        assert pid.isdigit()
        environ = env.sh("web1", f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()
        assert "GREETING=override" in environ  # -e replaces the image's value
        assert "ADDED=1" in environ
        assert "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" in environ  # the image's
        assert "HOME=/nonexistent" in environ  # the user's home in the image's passwd
        assert "\tUid:\t65534\t65534" in "\t" + env.sh("web1", f"grep Uid /proc/{pid}/status")
        assert env.sh("web1", f"readlink /proc/{pid}/cwd").strip() == "/oci/www"
        cmdline = env.sh("web1", f"tr '\\0' ' ' < /proc/{pid}/cmdline").strip()
        assert cmdline == "/bin/busybox httpd -f -v -p 8080 -h /www"
        # Inside the container, as `docker exec` would be:
        inside = env.ferry("vm", "exec", "web1", "--", "chroot", "/oci", "/bin/busybox", "cat",
                           "/www/index.html").stdout
        assert inside == "hello from an OCI image\n"
        # httpd -v logs each request on stderr: the console, which `vm logs` shows.
        assert "response:200" in env.ferry("vm", "logs", "web1").stdout
    finally:
        env.ferry("vm", "stop", "web1", check=False)

    # The same image with the same overrides: the cached snapshot is resumed.
    packages = sorted(p.name for p in (env.cache / "oci" / "packages").iterdir())
    again = env.run(f"oci://{env.httpd}", "--name", "web2", "-p", f"127.0.0.1:{port}:8080",
                    "-e", "GREETING=override", "-e", "ADDED=1")
    try:
        assert http_get(port) == b"hello from an OCI image\n"
        assert sorted(p.name for p in (env.cache / "oci" / "packages").iterdir()) == packages
        assert again["resume"]["running_s"] > 0
    finally:
        env.ferry("vm", "stop", "web2", check=False)


def test_redis_image_with_entrypoint_args_and_readiness(env: Env) -> None:
    port = free_port()
    env.run(f"oci://{env.redis}", "--name", "kv1", "-p", f"127.0.0.1:{port}:7000",
            "--entrypoint", "/usr/bin/redis-server",
            "--readiness", "chroot /oci redis-cli -p 7000 ping | grep -q PONG",
            "--", "--port", "7000", "--bind", "0.0.0.0", "--protected-mode", "no")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert s.recv(64) == b"+PONG\r\n"
        pid = env.sh("kv1", IMAGE_PID).strip()
        cmdline = env.sh("kv1", f"tr '\\0' ' ' < /proc/{pid}/cmdline").strip()
        assert cmdline == "/usr/bin/redis-server 0.0.0.0:7000"  # redis rewrites its argv
        assert env.sh("kv1", f"readlink /proc/{pid}/cwd").strip() == "/oci/data"
        # What redis printed while the snapshot's boot started it, then the resumed VM's.
        logs = env.ferry("vm", "logs", "kv1").stdout
        assert "Ready to accept connections" in logs
        # ... before the resumed VM's own console (the agent sets the clock after a resume)
        assert logs.index("Ready to accept connections") < logs.rindex("ferry-agent: clock set")
    finally:
        env.ferry("vm", "stop", "kv1", check=False)


def test_run_refuses_a_missing_image_in_one_line(env: Env) -> None:
    registry = env.httpd.split("/")[0]
    proc = env.ferry("vm", "run", f"oci://{registry}/nosuch:tag", "--name", "x1", check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("ferry: error: image ")
    assert "manifest unknown" in lines[-1]


def test_an_image_runs_through_the_daemon_api(env: Env) -> None:
    """``POST /v1/vms`` with ``oci://``: the same pull, boot-once and resume as the CLI's,
    as an operation; overrides are for images only."""
    from ferry.daemon.client import DaemonClient, DaemonError

    proc = subprocess.Popen([*FERRY, "daemon", "--json", "--warm-holders", "0"], env=env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline() or "{}").get("event") == "listening"
        api = DaemonClient.unix(Path(env.env["FERRY_RUN_DIR"]) / "ferryd.sock")
        with pytest.raises(DaemonError) as refused:
            api.call("POST", "/v1/vms", {"package": "/nonexistent.ferry",
                                         "entrypoint": "/bin/sh"})
        assert refused.value.status == 422
        port = free_port()
        op = api.wait(api.call("POST", "/v1/vms", {
            "package": f"oci://{env.httpd}", "name": "web-api",
            "publish": [f"127.0.0.1:{port}:8080"], "env": ["GREETING=api"]}))
        assert op["state"] == "succeeded", op
        assert http_get(port) == b"hello from an OCI image\n"
        pid = env.sh("web-api", IMAGE_PID).strip()
        assert "GREETING=api" in env.sh(
            "web-api", f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()
        assert api.call("POST", "/v1/vms/web-api/stop", {})["mode"] == "discard"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
