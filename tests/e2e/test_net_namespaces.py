"""Real network namespaces, veths, bridges, nft tables and port forwards.

QEMU is not involved: each VM's guest is a namespace (``NamespaceGuest``)
holding the guest's address and MAC on the VM's bridge, running a small
TCP/UDP echo server on 10.0.2.15. Replies carry a tag naming the guest and
the source address the guest saw, so a test can tell which guest answered
and through which NAT. All traffic stays on loopback or inside namespaces
these tests create; the test hosts' switch has no uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.net import (
    NamespaceGuest,
    NetCommandError,
    PortForward,
    Proto,
    RunDir,
    VMNetwork,
    cleanup_leftovers,
    links,
    netns,
    nft,
)
from ferry.net.state import remove_resources
from ferry.testing.hosts import host_namespaces


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        return False
    probe = f"ferry-probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return ok


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not _netns_usable(), reason="needs root, iproute2 with `ip netns` support, and nft"
    ),
]

SRC = str(Path(__file__).resolve().parents[2] / "src")

ECHO_SERVER = textwrap.dedent("""
    import asyncio, sys
    host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    async def on_tcp(reader, writer):
        data = await reader.read()          # until the client's half-close
        peer = writer.get_extra_info("peername")[0]
        writer.write(f"{tag}|{peer}|".encode() + data)
        await writer.drain()
        writer.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport
        def datagram_received(self, data, addr):
            self.transport.sendto(f"{tag}|{addr[0]}|".encode() + data, addr)

    async def main():
        server = await asyncio.start_server(on_tcp, host, port)
        await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=(host, port))
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
""")

TCP_CLIENT = textwrap.dedent("""
    import socket, sys
    host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        print(out.decode())
    except OSError as exc:
        print(f"ERR {type(exc).__name__}")
""")

VM_OWNER = textwrap.dedent("""
    import asyncio, sys
    from ferry.net import NamespaceGuest, PortForward, VMNetwork

    async def main():
        net = VMNetwork(sys.argv[1], [PortForward("127.0.0.1", 0, 7)],
                        attachment=NamespaceGuest(), run_dir=sys.argv[2])
        await net.start()
        print("up", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def vm_id() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def run_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """A private run dir; whatever is still recorded in it at the end is force-removed."""
    path = tmp_path / "run"
    try:
        yield path
    finally:
        for record in RunDir(path).records():
            await remove_resources(record)


@contextlib.asynccontextmanager
async def echo_server(
    namespace: str, host: str, port: int, tag: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A TCP+UDP echo server on ``host:port`` inside ``namespace``, ready when entered."""
    proc = await asyncio.create_subprocess_exec(
        *netns.netns_exec_argv(namespace, [sys.executable, "-c", ECHO_SERVER, host, str(port),
                                           tag]),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def tcp_exchange(host: str, port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, return everything the peer sent back."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


def _udp_exchange_blocking(host: str, port: int, payload: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(5):  # UDP may drop a datagram; retry a bounded number of times
            s.sendto(payload, (host, port))
            try:
                return s.recv(65536)
            except TimeoutError:
                continue
    raise AssertionError(f"no UDP reply from {host}:{port}")


async def udp_exchange(host: str, port: int, payload: bytes) -> bytes:
    return await asyncio.to_thread(_udp_exchange_blocking, host, port, payload)


async def run_in(namespace: str, script: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *netns.netns_exec_argv(namespace, [sys.executable, "-c", script, *args]),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode().strip()


async def assert_gone(net: VMNetwork, host_link: str) -> None:
    assert not netns.exists(net.namespace)
    guest_ns = net.guest_namespace
    assert guest_ns is None or not netns.exists(guest_ns)
    assert not await links.link_exists(net.parent, host_link)
    assert not await nft.table_exists(nft.TableRef(net.parent, "ip", net.table))


# ---------------------------------------------------------------------------------------


async def test_vmnetwork_creates_and_removes_everything(run_dir: Path) -> None:
    fwd = PortForward("127.0.0.1", 0, 6379)
    net = VMNetwork(vm_id(), [fwd], run_dir=run_dir)
    async with net:
        assert netns.exists(net.namespace)
        inside = await links.link_names(net.namespace)
        assert {"ferry-tap0", "ferry-br0", "ferry-up0"} <= inside
        assert await links.link_exists(None, net.host_link)
        assert f"{net.parent_link_ip}/30" in await links.ipv4_addresses(None)
        vm_rules = await nft.list_ruleset(nft.TableRef(net.namespace, "ip", net.table))
        assert 'tcp dport 6379 dnat to 10.0.2.15:6379' in vm_rules
        assert "ip saddr 10.0.2.0/24" in vm_rules
        assert "masquerade" in vm_rules
        host_rules = await nft.list_ruleset(nft.TableRef(None, "ip", net.table))
        assert f"ip saddr {net.link_network}" in host_rules
        assert "masquerade" in host_rules
        assert net.qemu_netdev_args() == [
            "-netdev", "tap,id=net0,ifname=ferry-tap0,script=no,downscript=no",
            "-device", "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
        ]
        assert net.wrap_argv(["qemu"]) == ["ip", "netns", "exec", net.namespace, "qemu"]
        # The listener is real and bound on loopback.
        host, port = net.local_address(fwd)
        assert host == "127.0.0.1"
        assert port > 0
        host_link = net.host_link
        assert len(RunDir(run_dir).records()) == 1
    await assert_gone(net, host_link)
    assert RunDir(run_dir).records() == []
    with pytest.raises(ConnectionRefusedError):
        await tcp_exchange(host, port, b"x")


async def test_vmnetwork_removes_everything_on_exception(run_dir: Path) -> None:
    net = VMNetwork(vm_id(), attachment=NamespaceGuest(), run_dir=run_dir)
    seen: list[str] = []

    async def body() -> None:
        async with net:
            seen.append(net.host_link)
            assert netns.exists(net.namespace)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await body()
    await assert_gone(net, seen[0])


async def test_failed_start_rolls_back(run_dir: Path) -> None:
    """A forward whose port is taken fails start(); nothing of the VM stays behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        net = VMNetwork(vm_id(), [PortForward("127.0.0.1", port, 80)], run_dir=run_dir)
        with pytest.raises(Exception, match="cannot bind"):
            await net.start()
    assert not netns.exists(net.namespace)
    assert RunDir(run_dir).records() == []


async def test_tcp_and_udp_forwards_reach_the_guest(run_dir: Path) -> None:
    tcp = PortForward("127.0.0.1", 0, 7000)
    udp = PortForward("127.0.0.1", 0, 7000, proto=Proto.UDP)
    async with VMNetwork(vm_id(), [tcp, udp], attachment=NamespaceGuest(),
                         run_dir=run_dir, outbound=False) as net:
        assert net.guest_namespace is not None
        async with echo_server(net.guest_namespace, net.guest_ip, 7000, "g1"):
            payload = os.urandom(200_000)  # several segments both ways
            reply = await tcp_exchange(*net.local_address(tcp), payload)
            tag, seen_source, body = reply.split(b"|", 2)
            assert tag == b"g1"
            # The guest sees the VM namespace's veth address (the relay's hop), not loopback.
            assert seen_source == net.parent_link_ip.encode()
            assert body == payload

            reply = await udp_exchange(*net.local_address(udp), b"datagram")
            assert reply == f"g1|{net.parent_link_ip}|datagram".encode()


async def test_ipv6_loopback_forward(run_dir: Path) -> None:
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():  # noqa: ASYNC240
        pytest.skip("no IPv6 on this machine")
    fwd = PortForward("::1", 0, 7001)
    async with VMNetwork(vm_id(), [fwd], attachment=NamespaceGuest(), run_dir=run_dir,
                         outbound=False) as net:
        assert net.guest_namespace is not None
        async with echo_server(net.guest_namespace, net.guest_ip, 7001, "v6"):
            reply = await tcp_exchange(*net.local_address(fwd), b"hello")
            assert reply.startswith(b"v6|")
            assert reply.endswith(b"|hello")


async def test_two_vms_with_identical_guest_ips(run_dir: Path) -> None:
    f1 = PortForward("127.0.0.1", 0, 7000)
    f2 = PortForward("127.0.0.1", 0, 7000)
    async with (
        VMNetwork(vm_id(), [f1], attachment=NamespaceGuest(), run_dir=run_dir) as a,
        VMNetwork(vm_id(), [f2], attachment=NamespaceGuest(), run_dir=run_dir) as b,
    ):
        assert a.guest_ip == b.guest_ip
        assert a.guest_mac == b.guest_mac
        assert a.link_network != b.link_network
        assert a.guest_namespace is not None
        assert b.guest_namespace is not None
        async with (
            echo_server(a.guest_namespace, a.guest_ip, 7000, "vm-a"),
            echo_server(b.guest_namespace, b.guest_ip, 7000, "vm-b"),
        ):
            ra = await tcp_exchange(*a.local_address(f1), b"one")
            rb = await tcp_exchange(*b.local_address(f2), b"two")
            assert ra.split(b"|")[0] == b"vm-a"
            assert ra.endswith(b"|one")
            assert rb.split(b"|")[0] == b"vm-b"
            assert rb.endswith(b"|two")


async def test_same_vm_id_twice_is_refused(run_dir: Path) -> None:
    vid = vm_id()
    async with VMNetwork(vid, run_dir=run_dir):
        with pytest.raises(Exception, match="already has a network"):
            async with VMNetwork(vid, run_dir=run_dir):
                pass


async def _spawn_and_kill_owner(vid: str, run_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", VM_OWNER, vid, str(run_dir),
        stdout=asyncio.subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"up", line
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def test_cleanup_leftovers_after_owner_killed(run_dir: Path) -> None:
    vid = vm_id()
    await _spawn_and_kill_owner(vid, run_dir)
    [record] = RunDir(run_dir).records()
    assert not record.owner_alive()
    assert all(netns.exists(ns) for ns in record.namespaces)
    table = nft.TableRef(None, "ip", nft.table_name(vid))
    assert await nft.table_exists(table)
    [(_, host_link)] = record.links
    assert await links.link_exists(None, host_link)

    assert await cleanup_leftovers(run_dir) == [f"vm-{vid}"]

    assert not any(netns.exists(ns) for ns in record.namespaces)
    assert not await nft.table_exists(table)
    assert not await links.link_exists(None, host_link)
    assert RunDir(run_dir).records() == []


async def test_next_start_cleans_leftovers_of_same_vm(run_dir: Path) -> None:
    vid = vm_id()
    await _spawn_and_kill_owner(vid, run_dir)
    async with VMNetwork(vid, run_dir=run_dir) as net:
        [record] = RunDir(run_dir).records()
        assert record.owner_pid == os.getpid()
        assert netns.exists(net.namespace)
    assert not netns.exists(net.namespace)


async def test_cleanup_leaves_living_owners_alone(run_dir: Path) -> None:
    async with VMNetwork(vm_id(), run_dir=run_dir) as net:
        assert await cleanup_leftovers(run_dir) == []
        assert netns.exists(net.namespace)


# Test hosts ------------------------------------------------------------------------------


def _switch_tag() -> str:
    return uuid.uuid4().hex[:6]


async def test_hosts_reach_each_other_and_cut_link(run_dir: Path) -> None:
    async with host_namespaces(["a", "b", "c"], switch_tag=_switch_tag(),
                               run_dir=run_dir) as hosts:
        assert [h.address for h in hosts.values()] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        a, b, c = hosts["a"], hosts["b"], hosts["c"]
        async with echo_server(b.namespace, b.address, 9000, "host-b"):
            assert await run_in(a.namespace, TCP_CLIENT, b.address, "9000", "hi") == (
                f"host-b|{a.address}|hi")
            assert await run_in(c.namespace, TCP_CLIENT, b.address, "9000", "yo") == (
                f"host-b|{c.address}|yo")

            await hosts.cut_link("b")
            assert (await run_in(a.namespace, TCP_CLIENT, b.address, "9000", "hi")).startswith(
                "ERR")
            await hosts.restore_link("b")
            assert await run_in(a.namespace, TCP_CLIENT, b.address, "9000", "back") == (
                f"host-b|{a.address}|back")
        # The machine's own namespace is not on the switch.
        assert "10.77.0.1/24" not in await links.ipv4_addresses(None)
    assert not any(netns.exists(h.namespace) for h in hosts.values())
    assert not netns.exists(hosts.switch_namespace)
    assert RunDir(run_dir).records() == []


async def test_vm_on_a_host_forward_and_outbound_nat(run_dir: Path) -> None:
    """A VM on host b: its forward listens on b's address, reached from host a; its guest's
    outbound connections to host a leave masqueraded as host b."""
    async with host_namespaces(["a", "b"], switch_tag=_switch_tag(), run_dir=run_dir) as hosts:
        a, b = hosts["a"], hosts["b"]
        fwd = PortForward(b.address, 16379, 6379)
        async with VMNetwork(vm_id(), [fwd], parent=b.namespace, attachment=NamespaceGuest(),
                             run_dir=run_dir) as net:
            assert await links.link_exists(b.namespace, net.host_link)
            assert not await links.link_exists(None, net.host_link)
            assert await nft.table_exists(nft.TableRef(b.namespace, "ip", net.table))
            assert net.guest_namespace is not None
            async with echo_server(net.guest_namespace, net.guest_ip, 6379, "guest"):
                reply = await run_in(a.namespace, TCP_CLIENT, b.address, "16379", "ping")
                assert reply == f"guest|{net.parent_link_ip}|ping"
            async with echo_server(a.namespace, a.address, 9100, "host-a"):
                reply = await run_in(net.guest_namespace, TCP_CLIENT, a.address, "9100", "out")
                # Double NAT: the VM namespace hides 10.0.2.15, host b hides the veth.
                assert reply == f"host-a|{b.address}|out"
            host_link = net.host_link
        await assert_gone(net, host_link)


async def test_migrated_forward_recreated_on_other_host(run_dir: Path) -> None:
    """The same VM id and forward spec come up on host b after going down on host a."""
    async with host_namespaces(["a", "b", "c"], switch_tag=_switch_tag(),
                               run_dir=run_dir) as hosts:
        vid = vm_id()
        for name in ("a", "b"):
            host = hosts[name]
            fwd = PortForward(host.address, 16379, 6379)
            async with VMNetwork(vid, [fwd], parent=host.namespace,
                                 attachment=NamespaceGuest(), run_dir=run_dir) as net:
                assert net.guest_namespace is not None
                async with echo_server(net.guest_namespace, net.guest_ip, 6379, name):
                    reply = await run_in(hosts["c"].namespace, TCP_CLIENT, host.address,
                                         "16379", "x")
                    assert reply.split("|")[0] == name


async def test_outbound_false_blocks_guest_egress(run_dir: Path) -> None:
    async with host_namespaces(["a", "b"], switch_tag=_switch_tag(), run_dir=run_dir) as hosts:
        a, b = hosts["a"], hosts["b"]
        async with VMNetwork(vm_id(), parent=b.namespace, attachment=NamespaceGuest(),
                             run_dir=run_dir, outbound=False) as net:
            assert net.guest_namespace is not None
            async with echo_server(a.namespace, a.address, 9200, "host-a"):
                reply = await run_in(net.guest_namespace, TCP_CLIENT, a.address, "9200", "o")
                assert reply.startswith("ERR")


async def test_command_errors_are_translated() -> None:
    with pytest.raises(NetCommandError) as info:
        await links.set_up(None, "ferry-nonexist")
    assert info.value.argv[:2] == ("ip", "link")
    assert info.value.returncode != 0
    assert info.value.stderr.strip()


# The service address (docs/networking.md) --------------------------------------------------

SERVICE = "10.77.0.201"


async def _neighbour_mac(namespace: str, address: str) -> str:
    out = await run_in(namespace, "import subprocess, sys; print(subprocess.run(['ip', '-j', "
                       "'neigh', 'show', sys.argv[1]], capture_output=True, text=True).stdout)",
                       address)
    entries = [e for e in json.loads(out or "[]") if "lladdr" in e]
    return str(entries[0]["lladdr"]) if entries else ""


async def _mac(namespace: str) -> str:
    return (await run_in(namespace, "print(open('/sys/class/net/eth0/address').read())"))


async def _service_state(namespace: str) -> tuple[str, str]:
    """(route of SERVICE/32, proxy entries) in ``namespace``, as ``ip`` prints them."""
    route = await run_in(namespace, "import subprocess; print(subprocess.run(['ip', 'route', "
                         f"'show', '{SERVICE}/32'], capture_output=True, text=True).stdout)")
    proxy = await run_in(namespace, "import subprocess; print(subprocess.run(['ip', 'neigh', "
                         "'show', 'proxy'], capture_output=True, text=True).stdout)")
    return route, proxy


async def test_service_address_follows_the_vm_between_hosts(run_dir: Path) -> None:
    """Clients on host c reach the service address wherever the VM's network announced it;
    the old host forwards what still reaches it; the guest sees the real client address."""
    async with host_namespaces(["a", "b", "c"], switch_tag=_switch_tag(),
                               run_dir=run_dir) as hosts:
        a, b, c = hosts["a"], hosts["b"], hosts["c"]
        vid = vm_id()

        def net_on(host_name: str, suffix: str) -> VMNetwork:
            host = hosts[host_name]
            return VMNetwork(f"{vid}-{suffix}", [PortForward(host.address, 16379, 6379),
                                                 PortForward(host.address, 16379, 6379,
                                                             proto=Proto.UDP)],
                             parent=host.namespace, attachment=NamespaceGuest(),
                             run_dir=run_dir, service_address=SERVICE)

        async with net_on("a", "a") as na, net_on("b", "b") as nb:
            assert na.guest_namespace is not None
            assert nb.guest_namespace is not None
            async with echo_server(na.guest_namespace, na.guest_ip, 6379, "on-a"), \
                    echo_server(nb.guest_namespace, nb.guest_ip, 6379, "on-b"):
                # Not announced yet: nobody answers ARP for the address.
                assert (await run_in(c.namespace, TCP_CLIENT, SERVICE, "6379", "x")
                        ).startswith("ERR")
                na.announce_service()
                assert await na.wait_announced() == 4
                assert await run_in(c.namespace, TCP_CLIENT, SERVICE, "6379", "x") == (
                    f"on-a|{c.address}|x")  # no NAT on the way: the guest sees host c
                assert await _neighbour_mac(c.namespace, SERVICE) == await _mac(a.namespace)

                # The VM pauses on a, bound for b: a forwards what still reaches it.
                await na.redirect_service(b.address)
                assert await run_in(c.namespace, TCP_CLIENT, SERVICE, "6379", "y") == (
                    f"on-b|{c.address}|y")
                nb.announce_service()
                await nb.wait_announced()
                assert await _neighbour_mac(c.namespace, SERVICE) == await _mac(b.namespace)

                # a is gone; a client that still sends to a's MAC reaches b all the same.
                await na.close()
                assert await _service_state(a.namespace) == ("", "")
                await run_in(c.namespace, "import subprocess, sys; subprocess.run(['ip', "
                             "'neigh', 'replace', sys.argv[1], 'lladdr', sys.argv[2], 'dev', "
                             "'eth0'], check=True)", SERVICE, await _mac(a.namespace))
                assert await run_in(c.namespace, TCP_CLIENT, SERVICE, "6379", "z") == (
                    f"on-b|{c.address}|z")
                route, proxy = await _service_state(b.namespace)
                assert nb.host_link in route
                assert SERVICE in proxy
        assert await _service_state(b.namespace) == ("", "")


SERVICE_OWNER = textwrap.dedent("""
    import asyncio, sys
    from ferry.net import NamespaceGuest, PortForward, VMNetwork

    async def main():
        net = VMNetwork(sys.argv[1], [PortForward("127.0.0.1", 0, 7)], parent=sys.argv[3],
                        attachment=NamespaceGuest(), run_dir=sys.argv[2],
                        service_address=sys.argv[4])
        await net.start()
        net.announce_service()
        await net.wait_announced()
        print("up", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_cleanup_withdraws_a_killed_owner_s_service_address(run_dir: Path) -> None:
    async with host_namespaces(["a"], switch_tag=_switch_tag(), run_dir=run_dir) as hosts:
        a = hosts["a"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SERVICE_OWNER, vm_id(), str(run_dir), a.namespace, SERVICE,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC})
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.strip() == b"up", line
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        route, proxy = await _service_state(a.namespace)
        assert route
        assert SERVICE in proxy
        assert len(await cleanup_leftovers(run_dir)) == 1
        assert await _service_state(a.namespace) == ("", "")
