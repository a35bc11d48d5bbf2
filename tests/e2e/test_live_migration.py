"""Live migration end to end: real QEMU (TCG), FUSE, NBD, namespace hosts, peer processes.

Every host is a network namespace (``host_namespaces``) and every ferry peer
a separate process inside one (pyfuse3 allows one FUSE session per process).
The guests are built from small blueprints (cached after the first build).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.files import MARKER_STAGE1
from ferry.guest.image import build_blueprint, load_blueprint
from ferry.guest.image.blueprint import BuiltImage, parse_blueprint
from ferry.live.downtime import OVERLAPPED, STEPS
from ferry.net import cleanup_leftovers
from ferry.testing.hosts import HostSet, host_namespaces
from ferry.testing.peer_control import PeerProcess
from ferry.testing.workload import RedisWriter
from ferry.transport.certs import create_ca, create_host_cert

pytestmark = pytest.mark.e2e

MIGRATE_PORT = 7411
REDIS_HOST_PORT = 16379

COUNTER_BLUEPRINT = """
name = "live-counter"
memory_mib = 128
disk_size_mib = 16
[workload]
command = 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.2; done'
readiness = "true"
"""

TICK_RE = re.compile(rb"^tick (\d+)\r?$", re.MULTILINE)


def _ticks(path: str) -> list[int]:
    data = Path(path).read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [int(m.group(1)) for m in TICK_RE.finditer(complete)]


@pytest.fixture(scope="module")
def counter_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    d = tmp_path_factory.mktemp("img")
    return build_blueprint(parse_blueprint(COUNTER_BLUEPRINT, base_dir=d), d)


@pytest.fixture
async def hosts() -> AsyncIterator[HostSet]:
    async with host_namespaces(["lma", "lmb", "lmc"], switch_tag="lm") as hs:
        try:
            yield hs
        finally:
            await cleanup_leftovers()


@contextlib.asynccontextmanager
async def peer(hosts: HostSet, host: str, img: BuiltImage, work: Path,
               *extra: str) -> AsyncIterator[PeerProcess]:
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    args = ["--name", "lm", "--work-dir", str(work), "--kernel", str(img.kernel),
            "--initramfs", str(img.initramfs), "--memory-mib", str(img.blueprint.memory_mib),
            *extra]
    try:
        async with PeerProcess.start(hosts[host], args, work / "peer.log") as p:
            yield p
    finally:
        # A killed peer leaves its FUSE mount behind: detach it.
        await asyncio.to_thread(subprocess.run, ["fusermount3", "-uz", str(work / "mnt")],
                                capture_output=True, check=False)


async def migrate(src: PeerProcess, dst: PeerProcess, hosts: HostSet,
                  dst_host: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The source's report, the destination's, and the summary the source made of both."""
    listening = await dst.request({"cmd": "receive", "port": MIGRATE_PORT})
    out = await src.request({"cmd": "migrate", "host": hosts[dst_host].address,
                             "port": MIGRATE_PORT, "token": listening["token"]})
    received = await dst.next_event("received")
    assert received["ok"], received
    return out["report"], received["report"], out["summary"]


async def wait_ticks_beyond(console: str, tick: int) -> list[int]:
    deadline = time.monotonic() + 60
    while not (ticks := await asyncio.to_thread(_ticks, console)) or ticks[-1] < tick:
        assert time.monotonic() < deadline, f"{console}: no tick {tick}"
        await asyncio.sleep(0.2)
    return ticks


async def assert_continues(old_console: str, new_console: str) -> None:
    """The console counter continues on the new host where the old one stopped, no reboot."""
    old = await asyncio.to_thread(_ticks, old_console)
    new = await wait_ticks_beyond(new_console, old[-1] + 3)
    assert MARKER_STAGE1.encode() not in await asyncio.to_thread(Path(new_console).read_bytes)
    assert old[-1] < new[0] <= old[-1] + 2
    assert new == list(range(new[0], new[0] + len(new)))


async def test_running_vm_moves_and_continues(hosts: HostSet, counter_image: BuiltImage,
                                              tmp_path: Path) -> None:
    async with peer(hosts, "lma", counter_image, tmp_path / "a") as a, \
            peer(hosts, "lmb", counter_image, tmp_path / "b") as b:
        booted = await a.request({"cmd": "boot", "rootfs": str(counter_image.rootfs)})
        before = await a.request({"cmd": "exec", "command": "cat /proc/sys/kernel/random/boot_id"})
        src, dst, summary = await migrate(a, b, hosts, "lmb")
        assert src["outcome"] == "completed"
        assert src["handed_off"]
        assert dst["outcome"] == "completed"
        assert dst["receive"]["verified"]
        corrected = summary["downtime_corrected_ms"]
        slack = summary["downtime_corrected_uncertainty_ms"]
        assert corrected > 0
        # B acknowledges the hand-off only once its guest runs, so A's own view (paused ->
        # that acknowledgement, A's clock) cannot be shorter than the offset-corrected
        # figure (A paused -> B running), within that figure's uncertainty.
        assert summary["downtime_source_view_ms"] >= corrected - slack
        steps = summary["downtime_steps_ms"]
        assert list(steps) == [*STEPS, *OVERLAPPED]  # the documented steps, in order
        assert all(ms >= 0 for step, ms in steps.items() if step != "handoff")  # one clock
        assert steps["handoff"] >= -slack  # crosses hosts: offset-corrected
        assert dst["qemu_ready_before_handoff"]  # QEMU spawn was off the downtime path
        assert dst["prefetch_windows"] > 0  # virtio ring windows were warmed before the load
        # ... by storing them into the page cache (no FUSE read), and the load needed no read.
        assert dst["prefetch_ram_reads"] == 0
        assert dst["state_load_ram_reads"] == 0
        # The agent works on B, in the same boot of the same guest.
        after = await b.request({"cmd": "exec", "command": "cat /proc/sys/kernel/random/boot_id"})
        assert after["stdout"] == before["stdout"]
        status = await b.request({"cmd": "status"})
        await assert_continues(booted["console"], status["console"])
        assert (await a.request({"cmd": "status"}))["has_vm"] is False


async def test_memory_and_disk_equal_at_handoff(hosts: HostSet, counter_image: BuiltImage,
                                               tmp_path: Path) -> None:
    """Device state as a dirty device (fetched on demand), every device hashed at hand-off."""
    extra = ("--state", "device", "--record-digests")
    async with peer(hosts, "lma", counter_image, tmp_path / "a", *extra) as a, \
            peer(hosts, "lmb", counter_image, tmp_path / "b", *extra) as b:
        booted = await a.request({"cmd": "boot", "rootfs": str(counter_image.rootfs)})
        src, dst, _ = await migrate(a, b, hosts, "lmb")
        assert set(src["digests"]) == {"memory", "disk/root", "state"}
        assert dst["source_digests"] == src["digests"]
        assert dst["digests"] == src["digests"]
        assert dst["state_bytes"] == 0  # the state came as a device, not in the payload
        status = await b.request({"cmd": "status"})
        await assert_continues(booted["console"], status["console"])


async def test_chain_a_b_c_a_over_mutual_tls(hosts: HostSet, counter_image: BuiltImage,
                                             tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    await asyncio.to_thread(create_ca, tls / "ca")
    for name in ("lma", "lmb", "lmc"):
        await asyncio.to_thread(create_host_cert, tls / "ca", tls, name, [hosts[name].address])
    route = ["lma", "lmb", "lmc", "lma"]
    async with contextlib.AsyncExitStack() as stack:
        peers = [await stack.enter_async_context(
            peer(hosts, h, counter_image, tmp_path / f"hop{i}", "--tls-dir", str(tls),
                 "--tls-name", h)) for i, h in enumerate(route)]
        booted = await peers[0].request({"cmd": "boot", "rootfs": str(counter_image.rootfs)})
        consoles = [booted["console"]]
        for i in range(1, len(route)):
            _, dst, _ = await migrate(peers[i - 1], peers[i], hosts, route[i])
            assert dst["receive"]["verified"]
            consoles.append((await peers[i].request({"cmd": "status"}))["console"])
            await assert_continues(consoles[-2], consoles[-1])
        boot_ids = {(await peers[-1].request({"cmd": "exec", "command": "echo back on a"}))[
            "stdout"]}
        assert boot_ids == {"back on a\n"}


async def _assert_serving(a: PeerProcess, console: str) -> None:
    status = await a.request({"cmd": "status"})
    assert status["state"] == "running"
    result = await a.request({"cmd": "exec", "command": "echo still here"})
    assert result["stdout"] == "still here\n"
    ticks = await asyncio.to_thread(_ticks, console)
    await wait_ticks_beyond(console, ticks[-1] + 2)


async def test_destination_killed_before_handoff_leaves_vm_on_a(
        hosts: HostSet, counter_image: BuiltImage, tmp_path: Path) -> None:
    async with peer(hosts, "lma", counter_image, tmp_path / "a") as a:
        booted = await a.request({"cmd": "boot", "rootfs": str(counter_image.rootfs)})
        async with peer(hosts, "lmb", counter_image, tmp_path / "b") as b:
            listening = await b.request({"cmd": "receive", "port": MIGRATE_PORT})
            os.kill(b.proc.pid, signal.SIGSTOP)  # B hangs mid-migration ...
            migrating = asyncio.create_task(a.request(
                {"cmd": "migrate", "host": hosts["lmb"].address, "port": MIGRATE_PORT,
                 "token": listening["token"]}, check=False))
            await asyncio.sleep(1.0)
            b.kill()  # ... and dies
            reply = await migrating
        assert reply["ok"] is False
        assert reply["handed_off"] is False
        assert "before the hand-off" in reply["error"]
        await _assert_serving(a, booted["console"])
        # Nothing was lost: the same VM still migrates to a new peer on B.
        async with peer(hosts, "lmb", counter_image, tmp_path / "b2") as b2:
            await migrate(a, b2, hosts, "lmb")
            status = await b2.request({"cmd": "status"})
            await assert_continues(booted["console"], status["console"])


async def test_link_cut_before_handoff_leaves_vm_on_a(
        hosts: HostSet, counter_image: BuiltImage, tmp_path: Path) -> None:
    async with peer(hosts, "lma", counter_image, tmp_path / "a") as a, \
            peer(hosts, "lmb", counter_image, tmp_path / "b") as b:
        booted = await a.request({"cmd": "boot", "rootfs": str(counter_image.rootfs)})
        listening = await b.request({"cmd": "receive", "port": MIGRATE_PORT})
        os.kill(b.proc.pid, signal.SIGSTOP)  # hold B so the cut lands in the handshake
        migrating = asyncio.create_task(a.request(
            {"cmd": "migrate", "host": hosts["lmb"].address, "port": MIGRATE_PORT,
             "token": listening["token"]}, check=False))
        await asyncio.sleep(0.5)
        await hosts.cut_link("lmb")
        os.kill(b.proc.pid, signal.SIGCONT)
        reply = await migrating
        assert reply["ok"] is False
        assert reply["handed_off"] is False
        # B's proof of the token never reached A, so A never proved itself to B: B took
        # no VM and keeps listening for a source that authenticates (accept_peer).
        assert (await b.request({"cmd": "status"}))["has_vm"] is False
        await hosts.restore_link("lmb")
        await _assert_serving(a, booted["console"])


async def test_redis_under_write_load_loses_nothing(hosts: HostSet, tmp_path: Path) -> None:
    img = await asyncio.to_thread(build_blueprint, load_blueprint("redis"), tmp_path / "img")
    fwd = ("--forward", f"{REDIS_HOST_PORT}:6379")
    async with peer(hosts, "lma", img, tmp_path / "a", *fwd) as a, \
            peer(hosts, "lmb", img, tmp_path / "b", *fwd) as b:
        await a.request({"cmd": "boot", "rootfs": str(img.rootfs)})
        writer = RedisWriter([(hosts["lma"].address, REDIS_HOST_PORT),
                              (hosts["lmb"].address, REDIS_HOST_PORT)],
                             namespace=hosts["lmc"].namespace)
        stop = asyncio.Event()
        load = asyncio.create_task(writer.run(stop))
        try:
            async with asyncio.timeout(120):
                await writer.wait_acknowledged(50)
            await migrate(a, b, hosts, "lmb")
            at_handoff = len(writer.acknowledged)
            async with asyncio.timeout(120):
                await writer.wait_acknowledged(at_handoff + 50)  # writes continue on B
        finally:
            stop.set()
            await load
        assert await writer.lost() == []
        assert len(writer.acknowledged) >= 100
