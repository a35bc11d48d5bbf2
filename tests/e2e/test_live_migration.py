"""Live migration end to end on the user path: ``ferry vm run/receive/migrate/registry``.

Real QEMU (TCG), FUSE, NBD and namespace hosts; every command is the ``ferry``
CLI run inside a host's namespace with that host's own run and state dirs
(:class:`ferry.testing.site.Site`). The VM is the session's signed Redis
package (tests/e2e/conftest.py). What is proved: a VM moves under writes and
back without losing one, in the same boot; a guest whose RAM is rewritten
continuously arrives with every page as last acknowledged; a chain over mutual TLS and an
export into a package; a destination that hangs and dies, or a link cut, before
the hand-off leaves the VM serving on the source; a registry start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ferry.live.downtime import OVERLAPPED, STEPS
from ferry.live.summary import MigrationSummary
from ferry.net import netns
from ferry.net.netns import socket_in_netns
from ferry.testing.packages import Signer
from ferry.testing.redis_hops import REDIS_PORT, run_redis_hops
from ferry.testing.site import FERRY, Site, downtime, exited_within, scratch_root, site_on_hosts
from ferry.testing.workload import PAGE_BYTES, PageWriter, command
from ferry.transport.certs import create_ca, create_host_cert
from ferry.vm.registry import SUPERVISOR_RECORD, read_json

from .conftest import REDIS_KEYS

pytestmark = pytest.mark.e2e

# Host and VM names of this module only: VM networks are named after the VM, and other
# e2e runs may share the machine.
HOSTS = ("upa", "upb", "upc")
MIGRATE_PORT = 7521
REGISTRY_PORT = 7522
GREETING = REDIS_KEYS["greeting"].encode()


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with scratch_root("fup-") as path:
        yield path


@pytest.fixture
async def site(root: Path, signer: Signer) -> AsyncIterator[Site]:
    async with site_on_hosts(HOSTS, root, signer.env, switch_tag="up") as s:
        yield s


async def redis_get(site: Site, host: str, key: str) -> bytes:
    sock = await socket_in_netns(site.hosts[host].namespace)
    await asyncio.get_running_loop().sock_connect(sock, (site.address(host), REDIS_PORT))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(command("GET", key))
        header = await reader.readline()
        if header.startswith(b"$-1"):
            return b""
        return (await reader.readexactly(int(header[1:]) + 2))[:-2]
    finally:
        writer.close()


async def listed(site: Site, host: str) -> list[tuple[str, str]]:
    return [(v["vm_id"], v["status"]) for v in await site.ferry_json(host, "vm", "list")]


async def boot_id(site: Site, host: str, vm: str) -> str:
    return await site.ferry(host, "vm", "exec", vm, "--", "cat",
                            "/proc/sys/kernel/random/boot_id")


def assert_hop(reply: dict[str, Any], command_s: float) -> None:
    """What one ``ferry vm migrate --json`` reply must show for a completed hop."""
    s = MigrationSummary.from_json(reply["summary"])  # every documented key, well-typed
    assert (s.outcome, s.handed_off, s.verified) == ("completed", True, True)
    assert set(s.devices) == {"memory", "disk/root"}
    assert s.stop_reason is not None  # hybrid mode: the dirty cycles ended for a reason
    # The downtime is a part of the migration; the clock exchange ran, so there is an
    # offset-corrected figure, and the source's own view (which ends with B's "running"
    # acknowledgement) is never shorter than it, within its uncertainty.
    d = downtime(s)
    assert d.corrected_ms is not None
    assert d.uncertainty_ms is not None
    assert s.total_s is not None
    assert 0 < d.corrected_ms < min(s.total_s, command_s) * 1e3
    assert d.source_view_ms >= d.corrected_ms - d.uncertainty_ms
    qemu_ram = reply["source"]["ram_path"] == "qemu"
    # the documented steps (the overlapped flush and save are the engine path's)
    assert sorted(d.steps_ms) == sorted([*STEPS, *([] if qemu_ram else OVERLAPPED)])
    # Every step is on one host's clock except the hand-off, which crosses hosts and is
    # only right within the uncertainty.
    assert all(ms >= 0 for step, ms in d.steps_ms.items() if step != "handoff"), d.steps_ms
    assert d.steps_ms["handoff"] >= -d.uncertainty_ms
    dst = reply["destination"]
    assert dst["qemu_ready_before_handoff"]  # QEMU spawn was off the downtime path
    # Every host here has the package in its cache: the root disk stood on it, and only
    # what the guest wrote travelled (ferry.vm.overlays).
    root = s.devices["disk/root"]
    assert root.base_blocks > 0
    assert sum(root.bytes_by_phase.values()) < root.size_bytes // 2
    if qemu_ram:
        # RAM and device state came in QEMU's stream, every byte of it through the link
        memory = s.devices["memory"]
        assert memory.bytes_by_phase["qemu_stream"] == dst["ram_stream_bytes"] > 0
        return
    assert dst["prefetch_windows"] > 0  # virtio ring windows were warmed before the load
    # ... by storing them into the page cache (no FUSE read), and the load needed no read.
    assert dst["prefetch_ram_reads"] == 0
    assert dst["state_load_ram_reads"] == 0


@pytest.mark.parametrize("ram", ["qemu", "engine"])
async def test_redis_moves_under_writes_and_back_losing_nothing(
        site: Site, redis_package: Path, ram: str) -> None:
    """Both ways RAM can move: QEMU's stream (the default) and ferry's device engine."""
    hops = await run_redis_hops(site, redis_package, ["upa", "upb", "upa"], vm="up-r1",
                                migrate_port=MIGRATE_PORT, writes_between=30,
                                client_host="upc", migrate_extra=("--ram", ram))
    assert hops.lost == []
    assert hops.acknowledged >= 90
    for hop in hops.hops:
        assert_hop(hop.reply, hop.command_s)
        assert hop.reply["source"]["ram_path"] == ram
        assert hop.writes_during >= 30  # writes continued on the new host
        d = downtime(hop.summary)
        print(f"{hop.src}->{hop.dst}: downtime {d.corrected_ms} ms +-{d.uncertainty_ms} "
              f"(offset-corrected), {d.source_view_ms} ms (source's view), "
              f"total {hop.summary.total_s} s")
    # Back on A it is a normal supervised VM, gone from B, holding what it held before.
    assert await listed(site, "upa") == [("up-r1", "running")]
    assert await listed(site, "upb") == []
    assert await redis_get(site, "upa", "greeting") == GREETING
    # SIGTERM to the process holding a received VM (a host shutting down) ends it, and
    # it takes its VM's network with it.
    record = read_json(site.paths("upa").run_dir("up-r1") / SUPERVISOR_RECORD)
    assert record is not None
    os.kill(record["pid"], signal.SIGTERM)
    # A hang guard (the holder used to hang here, spinning in its teardown).
    assert await exited_within(record["pid"], 30.0)
    assert [n for n in netns.list_namespaces() if n.startswith("ferry-vm-up-r1-")] == []
    assert await listed(site, "upa") == []


PAGE_STRING_MIB = 32
"""Small enough to read back in about a second under TCG, big enough (8192 pages) that
the writes land all over it."""


async def test_pages_rewritten_continuously_arrive_as_last_acknowledged(
        site: Site, redis_package: Path) -> None:
    """A page writer rewrites random 4 KiB pages of a 32 MiB Redis string throughout two
    hops; after each, every page of the string is read back on the new host and must
    hold the value last acknowledged for it (untouched pages: zeros). A page the
    migration lost or sent stale is a mismatch."""
    pages = PageWriter([(site.address(h), REDIS_PORT) for h in ("upa", "upb")],
                       size_bytes=PAGE_STRING_MIB * 2**20, rate_per_s=500,
                       namespace=site.hosts["upc"].namespace, seed=11)
    hops = await run_redis_hops(site, redis_package, ["upa", "upb", "upa"], vm="up-p1",
                                migrate_port=MIGRATE_PORT, writes_between=30,
                                client_host="upc", loads=[pages])
    assert hops.lost == []
    assert len(pages.checks) == 2
    for hop in hops.hops:
        assert_hop(hop.reply, hop.command_s)
        said = hop.loads
        reason = hop.summary.stop_reason
        print(f"{hop.src}->{hop.dst}: stop_reason {reason and reason.value}, "
              f"{said['page_writes_during']} page writes "
              f"({said['page_writes_per_s_achieved']}/s), {said['pages_touched']} pages "
              f"touched, {said['pages_mismatched']} mismatched")
        assert said["pages_checked"] == PAGE_STRING_MIB * 2**20 // PAGE_BYTES
        assert said["pages_mismatched"] == 0
        assert said["page_writes_during"] > 0  # the guest wrote pages while it moved
        # The summary says why the dirty cycles ended.
        assert reason is not None
    assert pages.checks[-1].pages_touched > pages.checks[0].pages_touched > 0


async def test_chain_over_mutual_tls_in_one_boot_then_export(
        site: Site, redis_package: Path, root: Path) -> None:
    tls = root / "tls"
    if not (tls / "ca" / "ca.pem").exists():
        await asyncio.to_thread(create_ca, tls / "ca")
    for h in HOSTS:
        await asyncio.to_thread(create_host_cert, tls / "ca", tls / h, h, [site.address(h)])

    def mutual_tls(host: str) -> Sequence[str]:
        d = tls / host
        return ("--tls-cert", str(d / f"{host}.pem"), "--tls-key", str(d / f"{host}.key"),
                "--tls-ca", str(d / "ca.pem"))

    await site.vm_run("upa", "up-t1", redis_package, "-p",
                      f"{site.address('upa')}:{REDIS_PORT}:6379")
    before = await boot_id(site, "upa", "up-t1")
    for src, dst in (("upa", "upb"), ("upb", "upc"), ("upc", "upa")):
        started = time.monotonic()
        reply = await site.hop("up-t1", src, dst, MIGRATE_PORT, access=mutual_tls)
        assert_hop(reply, time.monotonic() - started)
        assert await listed(site, src) == []
        assert await boot_id(site, dst, "up-t1") == before  # the same guest, never rebooted
    assert await redis_get(site, "upa", "greeting") == GREETING
    # Export the VM on A into a package; it stops, and resuming the package brings it back.
    exported = root / "exported.ferry"
    reply = await site.ferry_json("upa", "vm", "migrate", "up-t1", "--to-package", str(exported))
    assert reply["package"] == str(exported)
    assert await listed(site, "upa") == []
    # Each host's history has the migrations that left it, whoever asked for them.
    on_a = await site.ferry_json("upa", "vm", "migrations", "--vm", "up-t1")  # the site
    # is the module's: other tests' VMs left these hosts too
    assert [(r["vm_id"], r["to"], r["state"]) for r in on_a] == [
        ("up-t1", f"{site.address('upb')}:{MIGRATE_PORT}", "succeeded"),
        ("up-t1", f"package:{exported}", "succeeded")]
    assert on_a[0]["summary"]["handed_off"] is True
    assert on_a[1]["summary"]["package"] == str(exported)
    on_b = await site.ferry_json("upb", "vm", "migrations", "--vm", "up-t1")
    assert [r["to"] for r in on_b] == [f"{site.address('upc')}:{MIGRATE_PORT}"]
    await site.vm_run("upa", "up-t2", exported, "-p", f"{site.address('upa')}:{REDIS_PORT}:6379")
    assert await redis_get(site, "upa", "greeting") == GREETING


async def assert_serving_on_a(site: Site, vm: str) -> None:
    assert await listed(site, "upa") == [(vm, "running")]
    assert await redis_get(site, "upa", "greeting") == GREETING
    out = await site.ferry("upa", "vm", "exec", vm, "--", "echo", "still here")
    assert out == "still here\n"


async def start_migrate_to_held_b(site: Site, vm: str,
                                  redis_package: Path) -> tuple[int, asyncio.Task[Any]]:
    """Run ``vm`` on A, a receiver on B that is then frozen (SIGSTOP), and start
    ``ferry vm migrate`` A -> B; the receiver's pid and the migrate task."""
    await site.vm_run("upa", vm, redis_package, "-p",
                      f"{site.address('upa')}:{REDIS_PORT}:6379")
    event = await site.receive("upb", MIGRATE_PORT)
    os.kill(event["pid"], signal.SIGSTOP)
    # Either way it ends within seconds (dead-peer detection): a hang fails after 120 s,
    # with the holders' task stacks printed.
    migrating = asyncio.create_task(
        site.run("upa", *site.migrate_args(vm, "upa", "upb", MIGRATE_PORT), timeout_s=120))
    return event["pid"], migrating


async def test_destination_dies_before_handoff_vm_stays_on_a_and_moves_later(
        site: Site, redis_package: Path) -> None:
    pid, migrating = await start_migrate_to_held_b(site, "up-f1", redis_package)
    await asyncio.sleep(1.0)  # B hangs at the launch exchange ...
    os.kill(pid, signal.SIGKILL)  # ... and dies
    result = await migrating
    assert result.returncode != 0
    assert "keeps running here" in result.stderr
    await assert_serving_on_a(site, "up-f1")
    # Nothing was lost: the same VM still migrates to a new receiver on B.
    before = await boot_id(site, "upa", "up-f1")
    started = time.monotonic()
    reply = await site.hop("up-f1", "upa", "upb", MIGRATE_PORT)
    assert_hop(reply, time.monotonic() - started)
    assert await boot_id(site, "upb", "up-f1") == before


async def test_link_cut_before_handoff_leaves_vm_on_a(site: Site, redis_package: Path) -> None:
    pid, migrating = await start_migrate_to_held_b(site, "up-c1", redis_package)
    await asyncio.sleep(0.5)  # the cut lands in the handshake
    await site.hosts.cut_link("upb")
    os.kill(pid, signal.SIGCONT)
    result = await migrating
    assert result.returncode != 0
    assert "keeps running here" in result.stderr
    # B's proof of the token never reached A, so A never proved itself to B: B took no VM
    # (its receiver may still be listening for a source: listed as waiting, not a VM).
    assert [s for _, s in await listed(site, "upb") if s != "waiting"] == []
    await site.hosts.restore_link("upb")
    await assert_serving_on_a(site, "up-c1")


async def test_a_capped_migration_keeps_to_its_cap_and_a_timeout_keeps_the_vm_here(
        site: Site, redis_package: Path) -> None:
    await site.vm_run("upa", "up-m1", redis_package, "-p",
                      f"{site.address('upa')}:{REDIS_PORT}:6379")
    # 10 Mbit/s would take over a minute for the guest's RAM: the timeout comes first,
    # before the hand-off, and the VM keeps serving on A.
    await site.receive("upb", MIGRATE_PORT)
    slow = await site.run("upa", *site.migrate_args("up-m1", "upa", "upb", MIGRATE_PORT),
                          "--max-mbit", "10", "--timeout", "2")
    assert slow.returncode != 0
    assert "timed out after 2 s before the hand-off" in slow.stderr
    await assert_serving_on_a(site, "up-m1")
    [record] = await site.ferry_json("upa", "vm", "migrations", "--vm", "up-m1")
    assert (record["state"], record["to"]) == ("failed", f"{site.address('upb')}:{MIGRATE_PORT}")
    await site.stop_host("upb")  # the receiver that got nothing
    # At 400 Mbit/s it goes through, no faster than the cap allows for the bytes on the
    # wire (a bound the cap guarantees, not a performance figure; what went compressed
    # counts as sent).
    reply = await site.hop("up-m1", "upa", "upb", MIGRATE_PORT, "--max-mbit", "400")
    summary = reply["summary"]
    assert summary["handed_off"] is True
    burst = 0.05 * 400e6 / 8
    assert summary["total_s"] >= (summary["wire_bytes"] - burst) * 8 / 400e6
    assert await redis_get(site, "upb", "greeting") == GREETING


async def test_a_vm_that_arrived_suspends_and_continues_there(site: Site,
                                                            redis_package: Path) -> None:
    await site.vm_run("upa", "up-s1", redis_package, "-p",
                      f"{site.address('upa')}:{REDIS_PORT}:6379")
    before = await boot_id(site, "upa", "up-s1")
    await site.hop("up-s1", "upa", "upb", MIGRATE_PORT)
    await site.ferry("upb", "vm", "exec", "up-s1", "--", "redis-cli", "set", "arrived", "yes")
    stopped = await site.ferry_json("upb", "vm", "stop", "up-s1", "--suspend")
    assert stopped["mode"] == "suspend"
    assert stopped["state_bytes"] > 0
    assert ("up-s1", "suspended") in await listed(site, "upb")
    # It continues on B with its forwards, the same guest (no reboot), with what it wrote.
    await site.ferry_json("upb", "vm", "run", "--detach", "--name", "up-s1")
    assert await boot_id(site, "upb", "up-s1") == before
    assert await redis_get(site, "upb", "arrived") == b"yes"
    assert await redis_get(site, "upb", "greeting") == GREETING
    await site.ferry("upb", "vm", "stop", "up-s1")
    assert site.paths("upb").state_dir("up-s1").exists() is False


async def first_pong_s(site: Site, host: str, started: float) -> float:
    """Seconds from ``started`` to the first PONG on ``host``'s Redis port."""
    while True:
        sock = await socket_in_netns(site.hosts[host].namespace)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(1.0):
                await asyncio.get_running_loop().sock_connect(
                    sock, (site.address(host), REDIS_PORT))
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


async def wait_listening(proc: asyncio.subprocess.Process, stderr: Path) -> None:
    """Read ``proc``'s JSON events until ``listening``; fail at once if it exits first."""
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:  # EOF: it exited (readline would return b"" forever, never yielding)
            code = await proc.wait()
            tail = (await asyncio.to_thread(stderr.read_text))[-2000:]
            pytest.fail(f"exited with {code} before listening: {tail}")
        if b'"listening"' in line:
            return


async def test_registry_start_is_post_copy(site: Site, redis_package: Path,
                                           tmp_path: Path) -> None:
    paths = site.paths("upc")
    env = {**os.environ, **site.env, "FERRY_RUN_DIR": str(paths.run_root),
           "FERRY_STATE_DIR": str(paths.state_root)}
    stderr = tmp_path / "registry.stderr"
    with stderr.open("wb") as err:
        # The token file's directory (<root>/hosts) need not exist: the registry makes it.
        registry = await asyncio.create_subprocess_exec(
            *site.hosts["upc"].exec_argv([*FERRY, "vm", "registry", str(redis_package.parent),
                                          "--listen", f"{site.address('upc')}:{REGISTRY_PORT}",
                                          "--json", "--token-file",
                                          str(site.token_file("upc"))]),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=err)
    try:
        async with asyncio.timeout(60):
            await wait_listening(registry, stderr)
        namespaces_before = set(netns.list_namespaces())
        started = time.monotonic()
        pong = asyncio.create_task(first_pong_s(site, "upb", started))
        ready = await site.ferry_json(
            "upb", "vm", "receive", "--detach", "--registry",
            f"{site.address('upc')}:{REGISTRY_PORT}", "--package", redis_package.name,
            "--name", "up-g1", "-p", f"{site.address('upb')}:{REDIS_PORT}:6379",
            "--token-file", str(site.token_file("upc")))
        async with asyncio.timeout(120):
            ttfr = await pong
        print(f"registry start: time to first PONG {ttfr * 1e3:.0f} ms "
              f"(receive reported running after {ready['running_s'] * 1e3:.0f} ms)")
        assert ready["origin"] == "registry"
        assert ready["report"]["receive"]["verified"] is True
        assert await redis_get(site, "upb", "greeting") == GREETING
        # A received VM's stop answers once it is gone: run dir, record, namespace.
        assert await listed(site, "upb") == [("up-g1", "running")]
        namespaces = [n for n in set(netns.list_namespaces()) - namespaces_before
                      if n.startswith("ferry-vm-up-g1-")]
        assert len(namespaces) == 1
        assert len(list(site.paths("upb").net_run_dir.glob("*up-g1-*.json"))) == 1
        stopped = await site.ferry_json("upb", "vm", "stop", "up-g1")
        assert stopped["mode"] == "discard"
        assert not site.paths("upb").run_dir("up-g1").exists()
        assert not any(netns.exists(n) for n in namespaces)
        assert list(site.paths("upb").net_run_dir.glob("*up-g1-*.json")) == []
        assert await listed(site, "upb") == []
    finally:
        registry.send_signal(signal.SIGTERM)
        await registry.wait()


async def test_ctrl_c_during_migrate_keeps_the_vm_on_the_source(
        site: Site, redis_package: Path) -> None:
    """SIGINT to ``ferry vm migrate`` before the hand-off: exit 130, the VM runs on A.

    "Before the hand-off" is made certain rather than hoped for: the receiver on B is
    frozen (SIGSTOP) before the migration starts, so the migration cannot get past its
    first exchange with B; the signal is sent once A's record says ``migrating``.
    """
    await site.vm_run("upa", "up-i1", redis_package, "-p",
                      f"{site.address('upa')}:{REDIS_PORT}:6379")
    event = await site.receive("upb", MIGRATE_PORT)
    os.kill(event["pid"], signal.SIGSTOP)
    try:
        proc = await site.start("upa", *site.migrate_args("up-i1", "upa", "upb", MIGRATE_PORT))
        record = site.paths("upa").run_dir("up-i1") / SUPERVISOR_RECORD
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
    await assert_serving_on_a(site, "up-i1")
