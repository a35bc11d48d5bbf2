"""Client connections that survive live migrations (docs/networking.md, "Connections
that survive a migration"), on the user path: ``ferry vm run --service-address``,
``ferry vm receive``, ``ferry vm migrate`` between namespace hosts, real QEMU (TCG).

The clients run on a host the VM never visits and use the VM's service address:
a TCP stream, counted and hashed at both ends, and a UDP request/response flow,
both across A -> B -> A; a Redis client on one connection across A -> B -> C -> A.
Every flow must end with 0 resets (no RST, no early EOF, no ICMP unreachable) and
the same connection it started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferry.testing.flows import TcpStream, UdpPinger, build_udp_echo
from ferry.testing.packages import Signer
from ferry.testing.redis_hops import GUEST_REDIS_PORT, run_redis_hops
from ferry.testing.site import Site, scratch_root, site_on_hosts

pytestmark = pytest.mark.e2e

HOSTS = ("cna", "cnb", "cnc", "cnd")
"""cna, cnb, cnc take the VM; the clients run on cnd."""
CLIENT = "cnd"
MIGRATE_PORT = 7531
SERVICE_ADDRESS = "10.77.0.231"
"""On the hosts' network (10.77.0.0/24), used by no host."""
STREAM_PORT = 7000
UDP_PORT = 7070
FLOW_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with scratch_root("fcn-") as path:
        yield path


@pytest.fixture
async def site(root: Path, signer: Signer) -> AsyncIterator[Site]:
    async with site_on_hosts(HOSTS, root, signer.env, switch_tag="cn") as s:
        yield s


async def start_guest_servers(site: Site, host: str, vm: str, udp_echo: Path) -> None:
    """The stream's echo (busybox nc, keeping a copy in /tmp/stream) and the UDP echo."""
    await site.ferry(host, "vm", "exec", vm, "--", "sh", "-c",
                     f"nc -l -p {STREAM_PORT} -e tee /tmp/stream "
                     "</dev/null >/dev/null 2>&1 &")
    await site.ferry(host, "vm", "exec", "--stdin", vm, "--", "sh", "-c",
                     "cat > /tmp/udp-echo && chmod +x /tmp/udp-echo",
                     input=await asyncio.to_thread(udp_echo.read_bytes))
    await site.ferry(host, "vm", "exec", vm, "--", "sh", "-c",
                     f"/tmp/udp-echo {UDP_PORT} </dev/null >/dev/null 2>&1 &")


async def test_tcp_stream_and_udp_flow_survive_a_to_b_to_a(
        site: Site, redis_package: Path, root: Path) -> None:
    udp_echo = await asyncio.to_thread(build_udp_echo, root)
    vm = "conn1"
    a = site.address("cna")
    await site.vm_run("cna", vm, redis_package, "--service-address", SERVICE_ADDRESS,
                      "-p", f"{a}:16379:{GUEST_REDIS_PORT}", "-p", f"{a}:17000:{STREAM_PORT}",
                      "-p", f"{a}:17070:{UDP_PORT}/udp")
    await start_guest_servers(site, "cna", vm, udp_echo)
    client_ns = site.hosts[CLIENT].namespace
    stream = TcpStream((SERVICE_ADDRESS, STREAM_PORT), namespace=client_ns)
    udp = UdpPinger((SERVICE_ADDRESS, UDP_PORT), namespace=client_ns)
    stop = asyncio.Event()
    async with asyncio.timeout(FLOW_TIMEOUT_S * 3):
        async with asyncio.TaskGroup() as tg:
            streaming = tg.create_task(stream.run(stop))
            pinging = tg.create_task(udp.run(stop))
            try:
                await stream.echoed_at_least(256 * 1024)
                hops = [("cna", "cnb"), ("cnb", "cna")]
                for src, dst in hops:
                    before, answered = stream.result.echoed_bytes, udp.result.answered
                    reply = await site.hop(vm, src, dst, MIGRATE_PORT)
                    assert reply["summary"]["handed_off"]
                    # Both flows go on after the hop, on their first connection.
                    await stream.echoed_at_least(before + 256 * 1024)
                    await udp.answered_at_least(answered + 20)
            finally:
                stop.set()
    s, u = streaming.result(), pinging.result()
    assert (s.resets, s.error) == (0, None)
    assert s.echoed_bytes == s.sent_bytes > 512 * 1024
    assert s.echoed_sha256 == s.sent_sha256
    # The guest's copy of the stream: every byte once, in order.
    guest = (await site.ferry("cna", "vm", "exec", vm, "--", "sh", "-c",
                              "wc -c < /tmp/stream; sha256sum /tmp/stream")).split()
    assert (int(guest[0]), guest[1]) == (s.sent_bytes, s.sent_sha256)
    assert u.resets == 0
    assert u.answered == u.requests > 100
    # One server process answered throughout: its own count only grew.
    assert all(x < y for x, y in zip(u.counts, u.counts[1:], strict=False))


async def test_redis_connection_survives_a_b_c_a(site: Site, redis_package: Path) -> None:
    result = await run_redis_hops(site, redis_package, ["cna", "cnb", "cnc", "cna"],
                                  vm="conn2", migrate_port=MIGRATE_PORT, client_host=CLIENT,
                                  service_address=SERVICE_ADDRESS, writes_between=50)
    assert len(result.hops) == 3
    assert result.client_reconnects == 0
    assert result.lost == []
    assert result.acknowledged > 150
