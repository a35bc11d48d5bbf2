"""The node daemon end to end: a real ``ferry daemon`` process, real VMs, real sockets.

The daemon listens on its 0600 UNIX socket and on TCP (bearer token); the Redis
package of the session runs through the API, is exec'd into, scraped in
``/metrics``, announced on ``/v1/events``, outlives a SIGKILLed daemon, is
found by the restarted one and stopped through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection, unix_connect

from ferry.daemon.client import DaemonClient, DaemonError
from ferry.guest.agent import ExecOutcome
from ferry.net import cleanup_leftovers
from ferry.node import interactive as ia
from ferry.testing.hosts import host_namespaces
from ferry.testing.packages import Signer
from ferry.testing.site import Site, holder_pids
from ferry.vm.registry import VMPaths

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]
START_TIMEOUT_S = 30.0


@dataclass
class Daemon:
    root: Path
    paths: VMPaths
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    tcp: tuple[str, int] | None = None

    @property
    def socket(self) -> Path:
        return self.paths.run_root / "ferryd.sock"

    @property
    def token(self) -> str:
        return (self.root / "token").read_text().strip()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*FERRY, "daemon", "--json", "--listen-tcp", "127.0.0.1:0",
             "--token-file", str(self.root / "token")],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"the daemon did not start: {err}")
        info = json.loads(line)
        assert info["event"] == "listening"
        self.tcp = (info["tcp"][0], int(info["tcp"][1]))

    def stop(self, sig: int = signal.SIGTERM) -> str:
        assert self.proc is not None
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=30)
        self.proc = None
        return err

    def unix(self) -> DaemonClient:
        return DaemonClient.unix(self.socket)


@pytest.fixture(scope="module")
def daemon(signer: Signer) -> Iterator[Daemon]:
    root = Path(tempfile.mkdtemp(prefix="fd-"))  # short: UNIX socket paths
    paths = VMPaths(root / "run", root / "state")
    env = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(paths.run_root),
           "FERRY_STATE_DIR": str(paths.state_root),
           "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    d = Daemon(root, paths, env)
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None:
            with contextlib.suppress(Exception):
                d.stop()
        _stop_holders(paths)
        shutil.rmtree(root, ignore_errors=True)


def _ws_output(ws: ClientConnection) -> tuple[bytes, ia.Event]:
    """OUTPUT data until another event (which must come): both."""
    data = b""
    while True:
        message = ws.recv(timeout=60)
        assert isinstance(message, bytes)
        event = ia.decode_frame(message)
        if not isinstance(event, ia.Output):
            return data, event
        data += event.data


def _websocket_session_and_attach(daemon: Daemon, vm_id: str) -> None:
    with unix_connect(str(daemon.socket), uri=f"ws://localhost/v1/vms/{vm_id}/session") as ws:
        ws.send(json.dumps({"argv": ["sh", "-c", "tty; stty size; read x; echo got-$x; exit 4"],
                            "tty": True, "rows": 30, "cols": 90, "term": "xterm"}))
        assert json.loads(ws.recv(timeout=60))["pid"] > 0
        ws.send(ia.encode(ia.Input(b"over-ws\r")))
        ws.send(ia.encode(ia.Eof()))
        out, end = _ws_output(ws)
        assert end == ia.Exit(4, ExecOutcome.EXITED), out
        assert re.search(rb"/dev/pts/\d+\r\n", out), out
        assert b"30 90\r\n" in out
        assert b"got-over-ws\r\n" in out
    with unix_connect(str(daemon.socket), uri=f"ws://localhost/v1/vms/{vm_id}/attach") as ws:
        assert json.loads(ws.recv(timeout=60)) == {"attached": True}
        ws.send(ia.encode(ia.Input(b"\recho ws-attach-$((6*7))\r")))
        seen = b""
        while b"ws-attach-42" not in seen:
            message = ws.recv(timeout=60)
            assert isinstance(message, bytes)
            event = ia.decode_frame(message)
            assert isinstance(event, ia.Output), event
            seen += event.data


def _stop_holders(paths: VMPaths) -> None:
    """SIGTERM the holders of VMs a failed test left (they clean up), and wait for them."""
    for pid in holder_pids(paths):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(holder_pids(paths)) and time.monotonic() < deadline:
        time.sleep(0.2)


def _alive(pids: list[int]) -> bool:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            return True
    return False


def test_the_socket_is_owner_only_and_tcp_needs_the_token(daemon: Daemon) -> None:
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert daemon.unix().call("GET", "/v1/vms") == []
    assert daemon.tcp is not None
    host, port = daemon.tcp
    for token in (None, "ferry-not-the-token-0000000000000000000000"):
        status, body = DaemonClient.tcp(host, port, token).raw("GET", "/v1/vms")
        assert status == 401
        assert json.loads(body)["title"] == "Unauthorized"
    assert DaemonClient.tcp(host, port, daemon.token).call("GET", "/v1/vms") == []


def test_the_openapi_document_validates_and_names_the_routes(daemon: Daemon) -> None:
    doc = daemon.unix().call("GET", "/openapi.json")
    validate(doc)
    for path in ("/v1/node", "/v1/vms", "/v1/vms/{vm_id}", "/v1/vms/{vm_id}/stop",
                 "/v1/vms/{vm_id}/exec", "/v1/vms/{vm_id}/migrate", "/v1/operations/{op_id}",
                 "/v1/packages", "/v1/events", "/metrics"):
        assert path in doc["paths"], path


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/vms", b"{not json", 400),
    ("POST", "/v1/vms", b'{"package": "/x", "surprise": 1}', 422),
    ("POST", "/v1/vms", b'{"package": 7}', 422),
    ("POST", "/v1/vms", b'{"package": "/x", "name": "../../etc"}', 422),
    ("POST", "/v1/vms", b'{"package": "/nonexistent.ferry"}', 400),
    ("POST", "/v1/vms", b'{"package": "/x", "service_address": "a.b"}', 422),
    ("POST", "/v1/vms", b'{"package": "/x", "service_address": "127.0.0.1"}', 400),
    ("POST", "/v1/vms/nope/migrate", b'{"to": "h:1", "compression": "lz9"}', 422),
    ("POST", "/v1/vms/nope/exec", b'{"argv": []}', 422),
    ("POST", "/v1/vms/nope/exec", b'{"argv": ["true"]}', 404),
    ("GET", "/v1/vms/nope", None, 404),
    ("GET", "/v1/operations/op-999", None, 404),
    ("POST", "/v1/packages", b'{"file": "' + b"x" * 5000 + b'"}', 422),
    ("POST", "/v1/vms", b'{"package": "/x", "user_data": "MIME-Version: 1.0"}', 400),
    ("POST", "/v1/vms", b'{"package": "/x", "user_data": "#!' + b"x" * 70000 + b'"}', 422),
    ("POST", "/v1/vms", b'{"package": "/x", "env": ["1BAD=x"]}', 400),
    ("POST", "/v1/vms", b'{"package": "oci://r/x", "volumes": ["v"]}', 422),
    ("POST", "/v1/vms", b'{"package": "/x", "volumes": ["../etc"]}', 400),
    ("POST", "/v1/volumes", b'{"name": "../x", "size_mib": 1}', 422),
    ("POST", "/v1/volumes", b'{"name": "v", "size_mib": 0}', 422),
    ("DELETE", "/v1/volumes/nope-userdata", None, 404),
    ("POST", "/v1/vms", b"[" * 3 * 1024 * 1024, 413),
    ("POST", "/v1/vms", b'{"package": "/x", "mirror": {"url": "http://b/p"}}', 422),
    ("POST", "/v1/vms", b'{"package": "/x", "mirror": {"url": "s3://bkt"}}', 400),
    ("POST", "/v1/vms", b'{"package": "/x", "mirror": {"url": "s3://bkt/p", "key": 1}}', 422),
    ("POST", "/v1/restores", b'{"url": "file:///etc"}', 422),
    ("POST", "/v1/restores", b'{"url": "s3://bkt/p", "mirror": {"url": "s3://bkt/p/"}}', 422),
])
def test_bad_requests_get_problem_bodies(daemon: Daemon, method: str, path: str,
                                         body: bytes | None, status: int) -> None:
    got, raw = daemon.unix().raw(method, path, body)
    assert got == status, raw[:300]
    problem = json.loads(raw)
    assert problem["status"] == status
    assert problem["title"]
    assert "detail" in problem
    assert b"Traceback" not in raw


def test_volumes_through_the_api(daemon: Daemon) -> None:
    api = daemon.unix()
    made = api.call("POST", "/v1/volumes", {"name": "api-userdata", "size_mib": 2})
    assert (made["name"], made["size_bytes"], made["in_use"]) == ("api-userdata", 2 * 2**20,
                                                                  False)
    status, _ = api.raw("POST", "/v1/volumes", b'{"name": "api-userdata", "size_mib": 2}')
    assert status == 409
    assert [v["name"] for v in api.call("GET", "/v1/volumes")] == ["api-userdata"]
    status, _ = api.raw("DELETE", "/v1/volumes/api-userdata")
    assert status == 204
    assert api.call("GET", "/v1/volumes") == []


def test_a_chunked_body_is_refused_before_it_is_read(daemon: Daemon) -> None:
    """A body without a length could not be bounded before reading it: 411."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket))
        s.sendall(b"POST /v1/vms HTTP/1.1\r\nHost: ferry\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"10\r\n" + b"[" * 16 + b"\r\n")
        reply = b""
        while b"length-required" not in reply and (chunk := s.recv(65536)):
            reply += chunk  # the head and the body may come in separate segments
    assert reply.startswith(b"HTTP/1.1 411"), reply[:200]
    assert b"length-required" in reply


def _events(client: DaemonClient, into: list[dict[str, Any]], stop: threading.Event) -> None:
    with contextlib.suppress(Exception):
        for event in client.events(timeout_s=120):
            into.append(event)
            if stop.is_set():
                return


def test_a_vm_through_the_api_outlives_the_daemon(daemon: Daemon, redis_package: Path) -> None:
    events: list[dict[str, Any]] = []
    stop_events = threading.Event()
    follower = threading.Thread(target=_events, args=(daemon.unix(), events, stop_events),
                                daemon=True)
    follower.start()
    api = daemon.unix()
    follow = subprocess.Popen([*FERRY, "events", "--json"], env=daemon.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert follow.stdout is not None
    first = json.loads(follow.stdout.readline())  # subscribed before the run starts
    assert (first["kind"], first["vms"]) == ("subscribed", [])
    op = api.call("POST", "/v1/vms", {"package": str(redis_package), "name": "d-r1",
                                      "publish": ["127.0.0.1:0:6379"],
                                      "labels": {"team": "db"}, "env": ["ROLE=api db"],
                                      "user_data": "#!/bin/sh\necho ud-api $ROLE\n"})
    assert (op["kind"], op["state"], op["vm_id"]) == ("run", "running", "d-r1")
    op = api.wait(op)
    assert op["state"] == "succeeded", op
    assert op["result"]["vm_id"] == "d-r1"
    assert op["result"]["user_data"]["exit_code"] == 0
    assert op["result"]["env"] == ["ROLE"]
    [vm] = api.call("GET", "/v1/vms")
    assert (vm["vm_id"], vm["status"], vm["labels"]) == ("d-r1", "running", {"team": "db"})
    assert api.call("GET", "/v1/vms?label=team=db") == [vm]
    assert api.call("GET", "/v1/vms?label=team=web") == []
    filtered = subprocess.run([*FERRY, "vm", "ls", "--filter", "label=team", "--json"],
                              env=daemon.env, capture_output=True, text=True, timeout=60,
                              check=True)
    assert [v["vm_id"] for v in json.loads(filtered.stdout)] == ["d-r1"]
    detail = api.call("GET", "/v1/vms/d-r1")
    assert detail["qemu_pid"] == op["result"]["qemu_pid"]
    got = api.call("POST", "/v1/vms/d-r1/exec", {"argv": ["redis-cli", "get", "greeting"]})
    assert (got["exit_code"], got["stdout"].strip()) == (0, "hello")
    got = api.call("POST", "/v1/vms/d-r1/exec", {"argv": ["sh", "-c", "echo $ROLE"]})
    assert got["stdout"] == "api db\n"
    assert detail["user_data"]["kind"] == "script"
    # The guest's console: what it writes there is in `logs`, through the API and the CLI.
    api.call("POST", "/v1/vms/d-r1/exec",
             {"argv": ["sh", "-c", "echo ferry-console-mark > /dev/console"]})
    status, log = api.raw("GET", "/v1/vms/d-r1/logs")
    assert status == 200
    assert b"ferry-console-mark" in log
    cli_log = subprocess.run([*FERRY, "vm", "logs", "d-r1"], env=daemon.env,
                             capture_output=True, timeout=60, check=True).stdout
    assert b"ferry-console-mark" in cli_log
    # exec -it and attach as WebSockets: the same frames as the CLI's, relayed.
    _websocket_session_and_attach(daemon, "d-r1")
    # `ferry vm ls` asks the daemon (without importing the CLI) and says what the full
    # CLI, reading the run directory itself, says.
    fast = subprocess.run([sys.executable, "-X", "importtime", "-m", "ferry.cli.entry", "vm",
                           "ls", "--json"], env=daemon.env, capture_output=True, text=True,
                          timeout=60, check=True)
    assert "ferry.cli.main" not in fast.stderr
    assert "ferry.daemon.client" in fast.stderr
    full = subprocess.run([*FERRY, "vm", "list", "--json"], env=daemon.env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(fast.stdout) == json.loads(full.stdout) == [vm]
    node = api.call("GET", "/v1/node")
    assert node["vms"] == 1
    assert node["memory_committed_bytes"] == 256 * 1024 * 1024

    status, raw = api.raw("GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    up = {s.labels["vm"]: s.value for s in families["ferry_vm_up"].samples}
    assert up == {"d-r1": 1.0}
    committed = families["ferry_node_memory_committed_bytes"].samples[0].value
    assert committed == 256 * 1024 * 1024

    def per_vm(name: str) -> dict[str, float]:
        return {s.labels["vm"]: s.value for s in families[name].samples
                if not s.name.endswith("_created")}

    assert per_vm("ferry_vm_memory_bytes") == {"d-r1": 256 * 1024 * 1024}
    assert 0 < per_vm("ferry_vm_uptime_seconds")["d-r1"] < 600
    assert per_vm("ferry_vm_qemu_cpu_seconds")["d-r1"] > 0  # it resumed and ran Redis
    # Guest RAM through FUSE: the holder's counters, which the daemon asks for every half
    # second (0 is possible: the resume's preload may have stored every page the guest
    # touched, and a store is not a read).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, raw = api.raw("GET", "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
        if "d-r1" in per_vm("ferry_vm_fuse_read_bytes") and "d-r1" in per_vm(
                "ferry_vm_agent_up") and "d-r1" in per_vm(
                "ferry_vm_memory_dirty_bytes_per_second"):
            break
        time.sleep(0.2)
    # The holder pings the agent and has QEMU measure the dirty rate (Redis idles: the
    # kernel's own writes only); the root disk is read over NBD.
    assert per_vm("ferry_vm_agent_up") == {"d-r1": 1.0}
    assert 0 < per_vm("ferry_vm_agent_rtt_seconds")["d-r1"] < 5
    assert per_vm("ferry_vm_memory_dirty_bytes_per_second")["d-r1"] >= 0
    nbd = {(s.labels["disk"], s.labels["op"]): s.value
           for s in families["ferry_vm_nbd_requests"].samples
           if s.name == "ferry_vm_nbd_requests_total" and s.labels["vm"] == "d-r1"}
    assert set(nbd) >= {("root", "read"), ("root", "write"), ("root", "flush")}
    assert nbd[("root", "read")] > 0
    holder_io = api.call("GET", "/v1/vms/d-r1")["memory_io"]
    assert 0 <= per_vm("ferry_vm_fuse_read_bytes")["d-r1"] <= holder_io["bytes_read"]
    assert 0 <= per_vm("ferry_vm_fuse_reads")["d-r1"] <= holder_io["reads"]
    ops = {(s.labels["kind"], s.labels["state"]): s.value
           for s in families["ferry_operations"].samples if s.name == "ferry_operations_total"}
    assert ops[("run", "succeeded")] == 1.0

    # The event stream told of the operation and of the VM.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            e["kind"] == "vm" and e["vm_id"] == "d-r1" for e in events):
        time.sleep(0.1)
    stop_events.set()
    kinds = [(e["kind"], e.get("operation", {}).get("state") or e.get("status"))
             for e in events]
    assert ("operation", "running") in kinds, kinds
    assert ("operation", "succeeded") in kinds, kinds
    assert ("vm", "running") in kinds, kinds
    # `ferry events --json` printed the same stream, and Ctrl-C ends it at once.
    follow.send_signal(signal.SIGINT)
    out, _ = follow.communicate(timeout=15)
    assert follow.returncode == 130
    printed = [json.loads(line) for line in out.splitlines()]
    assert any(e["kind"] == "operation" and e["operation"]["id"] == op["id"]
               and e["operation"]["state"] == "succeeded" for e in printed), printed

    # SIGKILL the daemon: the VM is held by its own process and keeps serving.
    daemon.stop(signal.SIGKILL)
    holder = vm["pid"]
    os.kill(holder, 0)
    daemon.start()  # a stale socket file is replaced
    api = daemon.unix()
    [vm] = api.call("GET", "/v1/vms")
    assert (vm["vm_id"], vm["pid"]) == ("d-r1", holder)
    got = api.call("POST", "/v1/vms/d-r1/exec", {"argv": ["redis-cli", "ping"]})
    assert got["stdout"].strip() == "PONG"

    with pytest.raises(DaemonError) as running:
        api.call("DELETE", "/v1/vms/d-r1")  # running: only with ?force=true
    assert running.value.status == 409
    stopped = api.call("POST", "/v1/vms/d-r1/stop", {"mode": "suspend"})
    assert stopped["mode"] == "suspend"
    assert [(v["vm_id"], v["status"]) for v in api.call("GET", "/v1/vms")] == [
        ("d-r1", "suspended")]
    _suspended_vm_keeps_its_package_and_continues(daemon, api)
    assert api.call("DELETE", "/v1/vms/d-r1")["mode"] == "removed"
    assert api.call("GET", "/v1/vms") == []
    # Nothing uses the package now: pruning the cache removes it.
    [package] = api.call("GET", "/v1/packages")
    assert package["in_use"] is False
    pruned = api.call("POST", "/v1/packages/prune")
    assert pruned["package_ids"] == [package["package_id"]]
    assert pruned["freed_bytes"] == package["size_bytes"] > 0
    assert api.call("GET", "/v1/packages") == []
    assert not Path(package["directory"]).exists()
    with pytest.raises(DaemonError) as missing:
        api.call("GET", "/v1/vms/d-r1")
    assert missing.value.status == 404


def _suspended_vm_keeps_its_package_and_continues(daemon: Daemon, api: DaemonClient) -> None:
    """A suspended VM's package cannot be removed or pruned; the VM continues through the
    API with its state, and ``ferry vm inspect`` / ``stats`` describe it."""
    [package] = api.call("GET", "/v1/packages")
    assert package["in_use"] is True
    assert package["size_bytes"] > 0
    with pytest.raises(DaemonError) as used:
        api.call("DELETE", f"/v1/packages/{package['package_id'][:12]}")
    assert used.value.status == 409
    assert api.call("POST", "/v1/packages/prune")["package_ids"] == []
    removed = subprocess.run([*FERRY, "package", "rm", package["package_id"][:12]],
                             env=daemon.env, capture_output=True, text=True, timeout=60)
    assert removed.returncode != 0
    assert "used by a VM" in removed.stderr
    assert Path(package["directory"]).is_dir()

    assert api.call("GET", "/v1/vms?label=team=db")[0]["status"] == "suspended"
    op = api.wait(api.call("POST", "/v1/vms/d-r1/continue"))
    assert (op["kind"], op["state"]) == ("continue", "succeeded"), op
    assert api.call("GET", "/v1/vms/d-r1")["labels"] == {"team": "db"}  # kept
    got = api.call("POST", "/v1/vms/d-r1/exec", {"argv": ["redis-cli", "get", "greeting"]})
    assert got["stdout"].strip() == "hello"
    inspected = json.loads(subprocess.run(
        [*FERRY, "vm", "inspect", "d-r1"], env=daemon.env, capture_output=True, text=True,
        timeout=60, check=True).stdout)
    assert inspected == {**inspected, "vm_id": "d-r1", "status": "running",
                         "memory_bytes": 256 * 1024 * 1024}
    assert inspected["qemu_pid"] == op["result"]["qemu_pid"]
    assert inspected["qemu_usage"]["cpu_s"] > 0
    [row] = json.loads(subprocess.run(
        [*FERRY, "vm", "stats", "d-r1", "--json"], env=daemon.env, capture_output=True,
        text=True, timeout=60, check=True).stdout)
    assert (row["vm_id"], row["memory_bytes"]) == ("d-r1", 256 * 1024 * 1024)
    assert row["cpu_percent"] is not None
    assert row["cpu_percent"] >= 0
    assert api.call("POST", "/v1/vms/d-r1/stop", {"mode": "suspend"})["mode"] == "suspend"


def test_tcp_with_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(
        signer: Signer, tmp_path: Path) -> None:
    from ferry.transport.certs import create_ca, create_host_cert
    from ferry.transport.tls import client_context

    create_ca(tmp_path / "ca")
    server = create_host_cert(tmp_path / "ca", tmp_path / "server", "localhost",
                              ips=["127.0.0.1"])
    client = create_host_cert(tmp_path / "ca", tmp_path / "client", "client")
    create_ca(tmp_path / "other-ca")
    stranger = create_host_cert(tmp_path / "other-ca", tmp_path / "stranger", "client")
    root = Path(tempfile.mkdtemp(prefix="fdt-"))
    env = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(root / "run"),
           "FERRY_STATE_DIR": str(root / "state")}
    proc = subprocess.Popen(
        [*FERRY, "daemon", "--json", "--warm-holders", "0", "--listen-tcp", "127.0.0.1:0",
         "--tls-cert", str(server.cert_path), "--tls-key", str(server.key_path),
         "--tls-ca", str(server.ca_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline() or "{}")
        assert info.get("tcp_auth") == ["mtls"], info
        host, port = info["tcp"][0], int(info["tcp"][1])
        # No client certificate, or one of another CA: the handshake fails, no HTTP.
        import ssl as ssl_module
        anonymous = ssl_module.create_default_context(cafile=str(server.ca_path))
        for context in (anonymous, client_context(stranger.cert_path, stranger.key_path,
                                                  server.ca_path)):
            with pytest.raises((ssl_module.SSLError, ConnectionError)):
                DaemonClient.tcp(host, port, None, ssl_context=context).call(
                    "GET", "/v1/vms", timeout_s=10)
        ours = client_context(client.cert_path, client.key_path, client.ca_path)
        assert DaemonClient.tcp("127.0.0.1", port, None, ssl_context=ours).call(
            "GET", "/v1/vms", timeout_s=10) == []
        # The UNIX socket speaks plain HTTP, as always.
        assert DaemonClient.unix(root / "run" / "ferryd.sock").call("GET", "/v1/vms") == []
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    assert "Traceback" not in err


def _redis_ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"PING\r\n")
        return c.recv(64)


def _warm_holders(paths: VMPaths) -> list[dict[str, Any]]:
    found = []
    for rec in (paths.run_root / "vms").glob("warm-*/supervisor.json"):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(rec.read_text()))
    return [r for r in found if r.get("status") == "warm" and _alive([r["pid"]])]


def _wait_warm(api: DaemonClient) -> None:
    deadline = time.monotonic() + 120
    while api.call("GET", "/v1/node")["warm_vms"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert api.call("GET", "/v1/node")["warm_vms"] == 1


def test_a_warm_vm_is_claimed_by_the_next_run_and_ends_with_the_daemon(
        signer: Signer, redis_package: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="fdw-"))
    paths = VMPaths(root / "run", root / "state")
    env = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(paths.run_root),
           "FERRY_STATE_DIR": str(paths.state_root),
           "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    proc = subprocess.Popen([*FERRY, "daemon", "--json", "--warm-vms", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline() or "{}").get("event") == "listening"
        api = DaemonClient.unix(paths.run_root / "ferryd.sock")
        first = api.wait(api.call("POST", "/v1/vms", {"package": str(redis_package),
                                                     "name": "w1",
                                                     "publish": ["127.0.0.1:0:6379"]}))
        assert first["state"] == "succeeded", first
        assert "warm" not in first["result"]  # nothing was warm before the first run
        _wait_warm(api)
        [warm] = _warm_holders(paths)
        assert [v["vm_id"] for v in api.call("GET", "/v1/vms")] == ["w1"]  # not listed
        # A name in use is refused as always, and the warm VM stays for the next run.
        taken = api.wait(api.call("POST", "/v1/vms", {"package": str(redis_package),
                                                     "name": "w1"}))
        assert (taken["state"], taken["error"]["status"]) == ("failed", 409), taken
        assert api.call("GET", "/v1/node")["warm_vms"] == 1

        op = api.wait(api.call("POST", "/v1/vms", {"package": str(redis_package),
                                                  "name": "w2",
                                                  "publish": ["127.0.0.1:0:6379"]}))
        assert op["state"] == "succeeded", op
        ready = op["result"]
        assert (ready["vm_id"], ready["warm"], ready["resume"]["warm"]) == ("w2", True, True)
        # Primed: it ran before the claim and took a connection on the guest port w1 was
        # published on, so the claim only continued it.
        assert (ready["resume"]["primed_ports"], ready["resume"]["load_s"]) == ([6379], 0.0)
        assert ready["pid"] == warm["pid"]  # the warm VM's holder holds it now
        port = int(ready["forwards"][0].split("->")[0].rsplit(":", 1)[1])
        assert _redis_ping(port) == b"+PONG\r\n"
        got = api.call("POST", "/v1/vms/w2/exec", {"argv": ["redis-cli", "get", "greeting"]})
        assert got["stdout"].strip() == "hello"
        assert [(v["vm_id"], v["status"]) for v in api.call("GET", "/v1/vms")] == [
            ("w1", "running"), ("w2", "running")]
        status, log = api.raw("GET", "/v1/vms/w2/logs")
        assert status == 200
        assert log
        # Suspended, its state takes its own name; it continues as any suspended VM.
        assert api.call("POST", "/v1/vms/w2/stop", {"mode": "suspend"})["mode"] == "suspend"
        assert not paths.state_dir("w2").is_symlink()
        assert not paths.run_dir("w2").exists()
        cont = api.wait(api.call("POST", "/v1/vms/w2/continue"))
        assert cont["state"] == "succeeded", cont
        got = api.call("POST", "/v1/vms/w2/exec", {"argv": ["redis-cli", "get", "greeting"]})
        assert got["stdout"].strip() == "hello"
        for vm in ("w1", "w2"):
            assert api.call("POST", f"/v1/vms/{vm}/stop", {})["mode"] == "discard"
        # A replacement waits; the daemon dies (SIGKILL) and it discards itself.
        _wait_warm(api)
        [replacement] = _warm_holders(paths)
        proc.kill()
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 60
        while _alive([replacement["pid"]]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive([replacement["pid"]])
        assert list((paths.run_root / "vms").glob("warm-*")) == []
        assert list((paths.state_root / "vms").glob("*")) == []
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                    check=True).stdout
        assert replacement["vm_id"] not in namespaces
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        _stop_holders(paths)
        shutil.rmtree(root, ignore_errors=True)


def test_a_registry_start_and_an_image_build_through_the_api(
        daemon: Daemon, redis_package: Path, tmp_path: Path) -> None:
    api = daemon.unix()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "registry.token"
    registry = subprocess.Popen(
        [*FERRY, "vm", "registry", str(redis_package.parent), "--listen", f"127.0.0.1:{port}",
         "--json", "--token-file", str(token_file)],
        env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert registry.stdout is not None
        printed = ""  # the event is printed indented, over several lines
        while '"listening"' not in printed and (line := registry.stdout.readline()):
            printed += line
        assert '"listening"' in printed, printed
        bad = api.wait(api.call("POST", "/v1/starts", {
            "registry": f"127.0.0.1:{port}", "package": redis_package.name, "name": "g1",
            "token": "0" * 64}))  # well-formed, not the registry's
        assert bad["state"] == "failed", bad
        assert api.call("GET", "/v1/vms") == []
        op = api.wait(api.call("POST", "/v1/starts", {
            "registry": f"127.0.0.1:{port}", "package": redis_package.name, "name": "g1",
            "token": token_file.read_text().strip(), "publish": []}))
        assert (op["kind"], op["state"]) == ("registry-start", "succeeded"), op
        assert op["result"]["origin"] == "registry"
        got = api.call("POST", "/v1/vms/g1/exec", {"argv": ["redis-cli", "get", "greeting"]})
        assert got["stdout"].strip() == "hello"
        assert api.call("POST", "/v1/vms/g1/stop", {})["mode"] == "discard"
    finally:
        registry.send_signal(signal.SIGTERM)
        registry.communicate(timeout=30)
    with pytest.raises(DaemonError) as relative:
        api.call("POST", "/v1/images", {"blueprint": "../x.toml"})
    assert relative.value.status == 422
    # The Redis blueprint's image is in the cache (the package fixture built it).
    built = api.wait(api.call("POST", "/v1/images", {"blueprint": "redis"}))
    assert (built["kind"], built["state"]) == ("build", "succeeded"), built
    assert (built["result"]["blueprint"], built["result"]["cache_hit"]) == ("redis", True)
    assert Path(built["result"]["rootfs"]).is_file()


def test_a_waiting_receiver_is_listed_and_can_be_ended(daemon: Daemon) -> None:
    api = daemon.unix()
    recv = api.call("POST", "/v1/receivers", {"listen": "127.0.0.1:7543", "name": "wait-1"})
    try:
        [w] = api.call("GET", "/v1/vms")
        assert (w["vm_id"], w["status"], w["pid"]) == ("wait-1", "waiting", recv["pid"])
        assert w["forwards"] == ["listening on 127.0.0.1:7543"]
        listed = subprocess.run([*FERRY, "vm", "list", "--json"], env=daemon.env,
                                capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(listed.stdout) == [w]
        with pytest.raises(DaemonError) as plain:
            api.call("DELETE", "/v1/vms/wait-1")
        assert plain.value.status == 409
        assert "force" in plain.value.problem["detail"]
        assert api.call("DELETE", "/v1/vms/wait-1?force=true")["mode"] == "cancelled"
        deadline = time.monotonic() + 10
        while api.call("GET", "/v1/vms") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api.call("GET", "/v1/vms") == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(recv["pid"], signal.SIGTERM)


def test_sigterm_stops_the_daemon_cleanly(daemon: Daemon) -> None:
    err = daemon.stop(signal.SIGTERM)
    assert "Traceback" not in err
    assert not daemon.socket.exists()
    daemon.start()
    assert daemon.unix().call("GET", "/v1/vms") == []


async def test_a_vm_migrates_between_two_daemons(signer: Signer, redis_package: Path) -> None:
    """Two namespace hosts, a daemon on each: run on A, a receiver on B, migrate A -> B,
    all through the API; the VM serves on B and A's metrics saw the downtime."""
    root = Path(tempfile.mkdtemp(prefix="fdm-"))
    env = {**signer.env, "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    procs: list[asyncio.subprocess.Process] = []
    receiver: int | None = None
    async with host_namespaces(["dma", "dmb"], switch_tag="dm") as hs:
        site = Site(hs, root / "hosts", env)
        try:
            api = {}
            for h in ("dma", "dmb"):
                proc = await site.start(h, "daemon", "--json")
                procs.append(proc)
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
                assert json.loads(line)["event"] == "listening"
                api[h] = DaemonClient.unix(site.paths(h).run_root / "ferryd.sock")
            a, b = api["dma"], api["dmb"]
            addr_a, addr_b = site.address("dma"), site.address("dmb")

            async def call(c: DaemonClient, method: str, path: str, body: Any = None) -> Any:
                return await asyncio.to_thread(c.call, method, path, body)

            op = await call(a, "POST", "/v1/vms", {"package": str(redis_package),
                                                   "name": "dm-r1",
                                                   "publish": [f"{addr_a}:6379:6379"],
                                                   "labels": {"tier": "gold"}})
            op = await asyncio.to_thread(a.wait, op)
            assert op["state"] == "succeeded", op
            recv = await call(b, "POST", "/v1/receivers", {"listen": f"{addr_b}:7531"})
            receiver = recv["pid"]
            assert recv["token"]
            assert recv["address"] == [addr_b, 7531]
            seen: list[dict[str, Any]] = []
            stop_following = threading.Event()
            threading.Thread(target=_events, args=(a, seen, stop_following),
                             daemon=True).start()
            mig = await call(a, "POST", "/v1/vms/dm-r1/migrate",
                             {"to": f"{addr_b}:7531", "token": recv["token"]})
            assert (mig["kind"], mig["state"]) == ("migrate", "running")
            mig = await asyncio.to_thread(a.wait, mig)
            assert mig["state"] == "succeeded", mig
            stop_following.set()
            # While it ran, the operation reported the holder's progress.
            progress = [e["operation"]["progress"] for e in seen
                        if e["kind"] == "operation" and e["operation"]["id"] == mig["id"]
                        and e["operation"]["state"] == "running"
                        and e["operation"]["progress"] is not None]
            assert progress, seen
            assert max(p["bytes_sent"] for p in progress) > 0
            summary = mig["result"]["summary"]
            assert (summary["outcome"], summary["handed_off"], summary["verified"]) == (
                "completed", True, True)
            assert await call(a, "GET", "/v1/vms") == []
            [vm] = await call(b, "GET", "/v1/vms")
            assert (vm["vm_id"], vm["status"]) == ("dm-r1", "running")
            assert vm["labels"] == {"tier": "gold"}  # they travelled with it
            got = await call(b, "POST", "/v1/vms/dm-r1/exec",
                             {"argv": ["redis-cli", "get", "greeting"]})
            assert got["stdout"].strip() == "hello"
            _, raw = await asyncio.to_thread(a.raw, "GET", "/metrics")
            families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
            count = next(s.value for s in families["ferry_migration_downtime_seconds"].samples
                         if s.name.endswith("_count"))
            assert count == 1.0
            faults = next(s.value for s in
                          families["ferry_migration_postcopy_fault_latency_seconds"].samples
                          if s.name.endswith("_count"))
            assert faults == summary["faults"]
            phase_bytes = {s.labels["phase"]: s.value
                           for s in families["ferry_migration_phase_bytes"].samples
                           if s.name.endswith("_total")}
            assert sum(phase_bytes.values()) == sum(
                n for dev in summary["devices"].values()
                for n in dev["bytes_by_phase"].values())
            stopped = await call(b, "POST", "/v1/vms/dm-r1/stop", {})
            assert stopped["mode"] == "discard"
            # The migration is in A's history, and stays there across a daemon restart.
            [record] = await call(a, "GET", "/v1/migrations")
            assert record == {**record, "id": mig["result"]["migration"], "vm_id": "dm-r1",
                              "to": f"{addr_b}:7531", "state": "succeeded",
                              "operation": mig["id"], "summary": summary}
            procs[0].send_signal(signal.SIGTERM)
            await asyncio.wait_for(procs[0].communicate(), 30)
            procs[0] = await site.start("dma", "daemon", "--json")
            assert procs[0].stdout is not None
            await asyncio.wait_for(procs[0].stdout.readline(), START_TIMEOUT_S)
            # (the operation it ran in is the old daemon's, which the new one never knew)
            assert await call(a, "GET", f"/v1/migrations/{record['id']}") == {
                **record, "operation": None}
            assert await call(a, "GET", "/v1/migrations?vm=other") == []
        finally:
            if receiver is not None:  # still waiting if the migration never came: no record
                with contextlib.suppress(ProcessLookupError):
                    os.kill(receiver, signal.SIGTERM)
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.communicate(), 30)
            await site.stop_all()
            await cleanup_leftovers()
            shutil.rmtree(root, ignore_errors=True)


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900"):
        opts.add_argument(arg)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=opts)


def test_the_dashboard_shows_a_vm_and_migrates_it(daemon: Daemon, redis_package: Path,
                                                   tmp_path: Path) -> None:
    """A real Chromium opens the dashboard over TCP, sees the VM, starts its migration
    (to a receiver on this node) and watches it finish; a screenshot is kept."""
    api = daemon.unix()
    op = api.wait(api.call("POST", "/v1/vms", {"package": str(redis_package),
                                               "name": "ui-r1",
                                               "publish": ["127.0.0.1:0:6379"]}))
    assert op["state"] == "succeeded", op
    recv = api.call("POST", "/v1/receivers", {"listen": "127.0.0.1:7542", "name": "ui-r2",
                                              "publish": ["127.0.0.1:0:6379"]})
    try:
        _migrate_in_the_browser(daemon, recv["token"], tmp_path)
    except BaseException:
        # A receiver still waiting for its VM has no record yet: end it by its pid.
        with contextlib.suppress(ProcessLookupError):
            os.kill(recv["pid"], signal.SIGTERM)
        raise
    assert [v["vm_id"] for v in api.call("GET", "/v1/vms")] == ["ui-r2"]
    api.call("POST", "/v1/vms/ui-r2/stop", {})


def _migrate_in_the_browser(daemon: Daemon, token: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert daemon.tcp is not None
    host, port = daemon.tcp
    # Without the token the page loads (it holds no data) but the API refuses its calls.
    anonymous = DaemonClient.tcp(host, port, None)
    assert anonymous.raw("GET", "/ui")[0] == 200
    assert anonymous.raw("GET", "/v1/vms")[0] == 401
    driver = _browser()

    def query(script: str) -> Any:
        # Read the page in one script: it redraws its tables on every event, so an
        # element found in one call may be gone (stale) by the next.
        return driver.execute_script(script)

    def rows(table: str) -> list[list[str]]:
        return list(query(f"return [...document.querySelectorAll('#{table} tbody tr')]"
                          ".map(r => [r.id, r.dataset.state || r.dataset.status || '', "
                          "r.innerText])"))

    try:
        driver.get(f"http://{host}:{port}/ui#token={daemon.token}")
        wait = WebDriverWait(driver, 60, poll_frequency=0.2)
        wait.until(lambda d: ["vm-ui-r1", "running"] in [r[:2] for r in rows("vms")])
        # The VM picker keeps its choice across redraws; the inputs are never redrawn.
        query("document.getElementById('migrate-vm').value = 'ui-r1'")
        driver.find_element(By.ID, "migrate-to").send_keys("127.0.0.1:7542")
        driver.find_element(By.ID, "migrate-token").send_keys(token)
        driver.find_element(By.ID, "migrate-go").click()
        wait = WebDriverWait(driver, 180, poll_frequency=0.2)

        def migration() -> list[str] | Literal[False]:
            found = [r for r in rows("ops") if "migrate" in r[2]]
            return found[0] if found and found[0][1] in ("succeeded", "failed") else False

        row: list[str] = wait.until(lambda d: migration())
        assert row[1] == "succeeded", row
        assert "downtime" in row[2]
        wait.until(lambda d: [r[0] for r in rows("vms")] == ["vm-ui-r2"])
        assert query("return document.querySelectorAll('#downtimes .downtime-bar').length") == 1
        assert query("return document.getElementById('error').textContent") == ""
        shot = Path(os.environ.get("FERRY_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
        assert driver.save_screenshot(str(shot))
        print(f"dashboard screenshot: {shot}")
    finally:
        driver.quit()
