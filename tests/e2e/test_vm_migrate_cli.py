"""``ferry vm migrate|receive|registry`` end to end: real QEMU (TCG), FUSE, NBD, namespace hosts.

Every host is a network namespace with its own ferry run and state dirs; the
``ferry`` CLI runs inside it. One signed Redis package is made per module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.net import cleanup_leftovers, netns
from ferry.net.netns import socket_in_netns
from ferry.package import TrustStore, generate_key, load_private_key, write_package
from ferry.testing.hosts import HostSet, host_namespaces
from ferry.testing.workload import RedisWriter, command
from ferry.vm.manifest import VMManifest
from ferry.vm.registry import VMPaths, read_json
from ferry.vm.registry import cleanup_leftovers as cleanup_vms
from ferry.vm.snapshot import snapshot

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]
HOSTS = ("mga", "mgb", "mgc")
REDIS_PORT = 16379
MIGRATE_PORT = 7521
REGISTRY_PORT = 7522


@dataclass(frozen=True, slots=True)
class Site:
    root: Path
    env: dict[str, str]

    def paths(self, host: str) -> VMPaths:
        return VMPaths(self.root / host / "run", self.root / host / "state")

    def token_file(self, host: str) -> Path:
        """Where ``host``'s listening side writes its one-time token (mode 0600)."""
        return self.root / f"{host}.token"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="fmg-"))  # short: UNIX socket paths
    key = root / "keys" / "signing.key"
    env = {**os.environ, "FERRY_TRUST_DIR": str(root / "trusted"),
           "FERRY_SIGNING_KEY": str(key), "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    try:
        yield Site(root, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def package(site: Site) -> Path:
    """A signed Redis package (snapshotted with one key set)."""
    out = site.root / "redis-pkg"
    asyncio.run(snapshot("redis", out, prepare=["redis-cli set greeting hello"],
                         net_run_dir=site.root / "snap-net"))
    key = Path(site.env["FERRY_SIGNING_KEY"])
    generate_key(key)
    TrustStore.from_path(site.root / "trusted", missing_ok=True).add(
        key.with_name(key.name + ".pub"))
    (site.root / "registry").mkdir()
    file = site.root / "registry" / "redis.ferry"
    write_package(out, file, load_private_key(key), manifest=VMManifest.load(out).to_json())
    return file


@pytest.fixture
async def hosts(site: Site) -> AsyncIterator[HostSet]:
    async with host_namespaces(list(HOSTS), switch_tag="mg") as hs:
        try:
            yield hs
        finally:
            for h in HOSTS:
                await _stop_all(site.paths(h))
                await cleanup_leftovers(run_dir=site.paths(h).net_run_dir)
            await cleanup_leftovers()


async def _stop_all(paths: VMPaths) -> None:
    pids = []
    for rec in (paths.run_root / "vms").glob("*/supervisor.json"):
        pid = (read_json(rec) or {}).get("pid")
        if isinstance(pid, int):
            pids.append(pid)
    for pid in pids + _extra_pids.pop(str(paths.run_root), []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    await cleanup_vms(paths)


_extra_pids: dict[str, list[int]] = {}
"""Processes a test started that may not have a supervisor record (listening receivers)."""


def host_env(site: Site, host: str) -> dict[str, str]:
    paths = site.paths(host)
    return {**site.env, "FERRY_RUN_DIR": str(paths.run_root),
            "FERRY_STATE_DIR": str(paths.state_root)}


async def ferry_process(site: Site, hosts: HostSet, host: str,
                        *args: str) -> asyncio.subprocess.Process:
    """``ferry ARGS`` started on ``host`` (``ip netns exec`` execs it: the pid is ferry's)."""
    return await asyncio.create_subprocess_exec(
        *hosts[host].exec_argv([*FERRY, *args]), env=host_env(site, host),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def ferry(site: Site, hosts: HostSet, host: str, *args: str,
                check: bool = True, timeout_s: float = 300) -> tuple[int, str, str]:
    proc = await ferry_process(site, hosts, host, *args)
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    if check and proc.returncode != 0:
        pytest.fail(f"ferry {' '.join(args)} on {host} exited {proc.returncode}:\n"
                    f"{err.decode()}")
    return proc.returncode, out.decode(), err.decode()


async def ferry_json(site: Site, hosts: HostSet, host: str, *args: str) -> Any:
    _, out, _ = await ferry(site, hosts, host, *args, "--json")
    return json.loads(out)


async def receive(site: Site, hosts: HostSet, host: str, *extra: str) -> dict[str, Any]:
    event = await ferry_json(site, hosts, host, "vm", "receive", "--detach", "--listen",
                             f"{hosts[host].address}:{MIGRATE_PORT}",
                             "--token-file", str(site.token_file(host)), *extra)
    assert "token" not in event  # it went to the file only
    _extra_pids.setdefault(str(site.paths(host).run_root), []).append(event["pid"])
    assert isinstance(event, dict)
    return event


async def redis_get(hosts: HostSet, host: str, key: str) -> bytes:
    sock = await socket_in_netns(hosts[host].namespace)
    await asyncio.get_running_loop().sock_connect(sock, (hosts[host].address, REDIS_PORT))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(command("GET", key))
        header = await reader.readline()
        if header.startswith(b"$-1"):
            return b""
        return (await reader.readexactly(int(header[1:]) + 2))[:-2]
    finally:
        writer.close()


async def first_pong_s(hosts: HostSet, host: str, started: float) -> float:
    """Seconds from ``started`` to the first PONG on ``host``'s Redis port."""
    while True:
        sock = await socket_in_netns(hosts[host].namespace)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(1.0):
                await asyncio.get_running_loop().sock_connect(
                    sock, (hosts[host].address, REDIS_PORT))
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(command("PING"))
                line = await reader.readline()
                if line.strip() == b"+PONG":
                    return time.monotonic() - started
        except (OSError, TimeoutError):
            pass
        finally:
            # Once a transport owns the socket, only the transport may close it
            # (closing the bare fd lets a new socket reuse it under the transport).
            if writer is not None:
                writer.close()
            else:
                sock.close()
        await asyncio.sleep(0.005)


async def run_on_a(site: Site, hosts: HostSet, package: Path, name: str) -> None:
    await ferry(site, hosts, "mga", "vm", "run", "--detach", "--name", name, "-p",
                f"{hosts['mga'].address}:{REDIS_PORT}:6379", str(package))


async def migrate(site: Site, hosts: HostSet, src: str, dst: str, name: str) -> dict[str, Any]:
    await receive(site, hosts, dst)
    reply = await ferry_json(site, hosts, src, "vm", "migrate", name, "--to",
                             f"{hosts[dst].address}:{MIGRATE_PORT}",
                             "--token-file", str(site.token_file(dst)))
    assert isinstance(reply, dict)
    summary: dict[str, Any] = reply["summary"]
    assert summary["outcome"] == "completed"
    assert summary["verified"] is True
    corrected = summary["downtime_corrected_ms"]
    assert corrected > 0
    # The source's view ends with B's "running" acknowledgement: never shorter than the
    # offset-corrected figure, within its uncertainty.
    assert summary["downtime_source_view_ms"] >= (
        corrected - summary["downtime_corrected_uncertainty_ms"])
    assert set(summary["devices"]) == {"memory", "disk/root"}
    print(f"{src}->{dst}: downtime {corrected} ms "
          f"+-{summary['downtime_corrected_uncertainty_ms']} (offset-corrected), "
          f"{summary['downtime_source_view_ms']} ms (source's view), "
          f"total {summary['total_s']} s")
    return summary


async def test_migrate_under_writes_then_chain_b_c_a(site: Site, hosts: HostSet,
                                                    package: Path) -> None:
    await run_on_a(site, hosts, package, "r1")
    writer = RedisWriter([(hosts[h].address, REDIS_PORT) for h in HOSTS],
                         namespace=hosts["mga"].namespace)
    stop = asyncio.Event()
    load = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(120):
            await writer.wait_acknowledged(30)
        await migrate(site, hosts, "mga", "mgb", "r1")
        at_handoff = len(writer.acknowledged)
        async with asyncio.timeout(120):
            await writer.wait_acknowledged(at_handoff + 30)  # writes continue on B
    finally:
        stop.set()
        await load
    assert await writer.lost() == []
    # On B the VM is a normal supervised VM: listed, exec works; gone from A.
    listed = await ferry_json(site, hosts, "mgb", "vm", "list")
    assert [v["vm_id"] for v in listed] == ["r1"]
    assert await ferry_json(site, hosts, "mga", "vm", "list") == []
    _, out, _ = await ferry(site, hosts, "mgb", "vm", "exec", "r1", "--", "redis-cli",
                            "get", "greeting")
    assert out.strip() == "hello"
    # Chain: B -> C -> A, then the data written on A before the first hop is still there.
    await migrate(site, hosts, "mgb", "mgc", "r1")
    await migrate(site, hosts, "mgc", "mga", "r1")
    assert await redis_get(hosts, "mga", f"w:{writer.acknowledged[-1]}") == str(
        writer.acknowledged[-1]).encode()
    assert await ferry_json(site, hosts, "mgc", "vm", "list") == []
    # Export the VM on A into a package; it stops, and resuming the package brings it back.
    exported = site.root / "exported.ferry"
    reply = await ferry_json(site, hosts, "mga", "vm", "migrate", "r1", "--to-package",
                             str(exported))
    assert reply["package"] == str(exported)
    assert await ferry_json(site, hosts, "mga", "vm", "list") == []
    await ferry(site, hosts, "mga", "vm", "run", "--detach", "--name", "r2", "-p",
                f"{hosts['mga'].address}:{REDIS_PORT}:6379", str(exported))
    assert await redis_get(hosts, "mga", "greeting") == b"hello"
    assert await writer.lost() == []


async def test_failure_before_handoff_leaves_vm_serving_on_a(site: Site, hosts: HostSet,
                                                            package: Path) -> None:
    await run_on_a(site, hosts, package, "f1")
    event = await receive(site, hosts, "mgb")
    os.kill(event["pid"], signal.SIGSTOP)  # B hangs at the launch exchange ...
    migrating = asyncio.create_task(ferry(
        site, hosts, "mga", "vm", "migrate", "f1", "--to",
        f"{hosts['mgb'].address}:{MIGRATE_PORT}", "--token-file", str(site.token_file("mgb")),
        check=False))
    await asyncio.sleep(1.0)
    os.kill(event["pid"], signal.SIGKILL)  # ... and dies
    code, _, err = await migrating
    assert code != 0
    assert "keeps running here" in err
    listed = await ferry_json(site, hosts, "mga", "vm", "list")
    assert [(v["vm_id"], v["status"]) for v in listed] == [("f1", "running")]
    assert await redis_get(hosts, "mga", "greeting") == b"hello"


async def test_registry_start_is_post_copy(site: Site, hosts: HostSet, package: Path) -> None:
    registry = await asyncio.create_subprocess_exec(
        *hosts["mgc"].exec_argv([*FERRY, "vm", "registry", str(package.parent), "--listen",
                                 f"{hosts['mgc'].address}:{REGISTRY_PORT}", "--json",
                                 "--token-file", str(site.token_file("mgc"))]),
        env=host_env(site, "mgc"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        assert registry.stdout is not None
        async with asyncio.timeout(60):
            while b"listening" not in await registry.stdout.readline():
                pass
        namespaces_before = set(netns.list_namespaces())
        started = time.monotonic()
        pong = asyncio.create_task(first_pong_s(hosts, "mgb", started))
        ready = await ferry_json(site, hosts, "mgb", "vm", "receive", "--detach", "--registry",
                                 f"{hosts['mgc'].address}:{REGISTRY_PORT}", "--package",
                                 package.name, "--name", "g1", "-p",
                                 f"{hosts['mgb'].address}:{REDIS_PORT}:6379",
                                 "--token-file", str(site.token_file("mgc")))
        async with asyncio.timeout(120):
            ttfr = await pong
        print(f"registry start: time to first PONG {ttfr * 1e3:.0f} ms "
              f"(receive reported running after {ready['running_s'] * 1e3:.0f} ms)")
        assert ready["origin"] == "registry"
        assert ready["report"]["receive"]["verified"] is True
        assert await redis_get(hosts, "mgb", "greeting") == b"hello"
        # A received VM's stop answers once it is gone: run dir, record, namespace.
        assert [v["status"] for v in await ferry_json(site, hosts, "mgb", "vm", "list")] == [
            "running"]
        namespaces = [n for n in set(netns.list_namespaces()) - namespaces_before
                      if n.startswith("ferry-vm-g1-")]
        assert len(namespaces) == 1
        net_records = site.paths("mgb").net_run_dir.glob("*g1-*.json")
        assert len(list(net_records)) == 1
        stopped = await ferry_json(site, hosts, "mgb", "vm", "stop", "g1")
        assert stopped["mode"] == "discard"
        assert not site.paths("mgb").run_dir("g1").exists()
        assert not any(netns.exists(n) for n in namespaces)
        assert list(site.paths("mgb").net_run_dir.glob("*g1-*.json")) == []  # net records
        assert await ferry_json(site, hosts, "mgb", "vm", "list") == []
    finally:
        registry.send_signal(signal.SIGTERM)
        await registry.wait()


async def test_ctrl_c_during_migrate_keeps_the_vm_on_the_source(site: Site, hosts: HostSet,
                                                               package: Path) -> None:
    """SIGINT to ``ferry vm migrate`` before the hand-off: exit 130, the VM runs on A.

    "Before the hand-off" is made certain rather than hoped for: the receiver on B is
    frozen (SIGSTOP) before the migration starts, so the migration cannot get past its
    first exchange with B; the signal is sent once A's record says ``migrating``.
    """
    await run_on_a(site, hosts, package, "c1")
    event = await receive(site, hosts, "mgb")
    os.kill(event["pid"], signal.SIGSTOP)
    try:
        proc = await ferry_process(site, hosts, "mga", "vm", "migrate", "c1", "--to",
                                   f"{hosts['mgb'].address}:{MIGRATE_PORT}",
                                   "--token-file", str(site.token_file("mgb")))
        record = site.paths("mga").run_dir("c1") / "supervisor.json"
        async with asyncio.timeout(60):
            while (read_json(record) or {}).get("status") != "migrating":
                assert proc.returncode is None
                await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(90):
            _, err = await proc.communicate()
        assert proc.returncode == 130, err.decode()
        assert "cancelled before the hand-off" in err.decode()
    finally:
        os.kill(event["pid"], signal.SIGKILL)
    listed = await ferry_json(site, hosts, "mga", "vm", "list")
    assert [(v["vm_id"], v["status"]) for v in listed] == [("c1", "running")]
    assert await redis_get(hosts, "mga", "greeting") == b"hello"
    _, out, _ = await ferry(site, hosts, "mga", "vm", "exec", "c1", "--", "redis-cli", "ping")
    assert out.strip() == "PONG"
