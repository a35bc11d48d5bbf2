"""A VM's service address: one IPv4 address that follows the VM from host to host.

Clients connect to the service address, not to a host. The host that runs
the VM routes the address into the VM's namespace (a /32 over the VM's veth)
and answers ARP for it on the host's network (a proxy neighbour entry); the
VM's namespace rewrites it to the guest's fixed address and back without
connection tracking (see :meth:`ferry.net.vmnet.VMNetwork._service_rules`),
so nothing stateful about a client's connection lives outside the guest.

During a live migration (docs/networking.md, "Connections that survive a
migration")::

    A: guest paused   -> route SVC via B's address         (in-flight packets go to B,
                                                             where they wait in B's tap)
    B: guest running  -> proxy ARP for SVC + gratuitous ARP (clients now send to B)
    A: hand-off acked -> route and proxy entry removed      (a client that missed the
                                                             announcement still reaches B:
                                                             A ARPs for SVC, B answers)

This module holds the host-side pieces: the route, the proxy entry and the
announcement frames. Packet layout of the announcement (an ARP request whose
sender and target address are both the service address, broadcast; what
QEMU's ``announce-self`` and keepalived send)::

    dst ff:ff:ff:ff:ff:ff | src <host MAC> | 0x0806
    htype 1 | ptype 0x0800 | hlen 6 | plen 4 | op 1 (request)
    sha <host MAC> | spa SVC | tha 00:00:00:00:00:00 | tpa SVC
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import struct

from ferry.net import netns
from ferry.net.command import run
from ferry.net.errors import NetConfigError, NetError

log = logging.getLogger(__name__)

ANNOUNCE_DELAYS_S = (0.0, 0.05, 0.2, 1.0)
"""When the gratuitous ARPs go out after the guest runs on a host (from that moment).
Several, as QEMU's ``announce-self`` sends several (its default: 5, 50 ms apart,
growing by 100 ms): one lost frame must not leave a client sending to the old host."""
_ETH_P_ARP = 0x0806
_BROADCAST = b"\xff" * 6


def check_service_address(address: str) -> str:
    """A literal, unicast IPv4 address (the service address is routed as a /32)."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError as exc:
        raise NetConfigError(f"service address {address!r} is not an IPv4 address") from exc
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        raise NetConfigError(f"service address {address} must be a unicast address")
    return str(ip)


def garp_frame(mac: bytes, address: str) -> bytes:
    """The Ethernet frame announcing that ``address`` is at ``mac`` (see the module doc)."""
    if len(mac) != 6:
        raise NetConfigError(f"a MAC address has 6 bytes, got {len(mac)}")
    ip = ipaddress.IPv4Address(address).packed
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
    return _BROADCAST + mac + struct.pack("!H", _ETH_P_ARP) + arp


async def uplink_of(namespace: str | None, address: str) -> str:
    """The interface of ``namespace`` through which ``address`` is reached now (the
    host's network, before any /32 of ours exists)."""
    out = await run(netns.ip_argv(namespace, "-j", "route", "get", address))
    try:
        routes = json.loads(out)
        dev = str(routes[0]["dev"])
    except (ValueError, LookupError, TypeError) as exc:
        raise NetError(f"cannot tell the interface towards {address}: {out!r}") from exc
    return dev


async def route_to_vm(namespace: str | None, address: str, *, link: str, via: str) -> None:
    """Route ``address`` into the VM's veth ``link`` (its namespace end is ``via``)."""
    await run(netns.ip_argv(namespace, "route", "replace", f"{address}/32", "via", via,
                            "dev", link))


async def route_to_host(namespace: str | None, address: str, *, host: str, dev: str) -> None:
    """Route ``address`` to another host (the one the VM is moving to) and stop answering
    ARP for it here: packets that still arrive here go on to ``host``."""
    await run(netns.ip_argv(namespace, "route", "replace", f"{address}/32", "via", host,
                            "dev", dev))
    await unpublish(namespace, address, dev)


async def withdraw(namespace: str | None, address: str, dev: str) -> None:
    """Remove the /32 route and the proxy entry, whatever the route points at. Idempotent."""
    await run(netns.ip_argv(namespace, "route", "del", f"{address}/32"), check=False)
    await unpublish(namespace, address, dev)


async def publish(namespace: str | None, address: str, dev: str) -> None:
    """Answer ARP for ``address`` on ``dev`` (a proxy neighbour entry)."""
    await run(netns.ip_argv(namespace, "neigh", "replace", "proxy", address, "dev", dev))


async def unpublish(namespace: str | None, address: str, dev: str) -> None:
    """Stop answering ARP for ``address`` on ``dev``. Idempotent."""
    await run(netns.ip_argv(namespace, "neigh", "del", "proxy", address, "dev", dev),
              check=False)


async def announce(namespace: str | None, address: str, dev: str,
                   delays_s: tuple[float, ...] = ANNOUNCE_DELAYS_S) -> int:
    """Send gratuitous ARPs for ``address`` from ``dev`` at ``delays_s`` (from now).

    Returns the number of frames sent. Raises :class:`NetError` if the raw socket
    cannot be opened or bound (needs CAP_NET_RAW in ``namespace``).
    """
    try:
        sock = await netns.socket_in_netns(namespace, socket.AF_PACKET, socket.SOCK_RAW)
    except OSError as exc:
        raise NetError(f"cannot open a raw socket to announce {address}: {exc}") from exc
    loop = asyncio.get_running_loop()
    sent = 0
    with sock:
        try:
            sock.bind((dev, _ETH_P_ARP))
            mac = sock.getsockname()[4]
            frame = garp_frame(mac, address)
            start = loop.time()
            for delay in delays_s:
                await asyncio.sleep(max(0.0, start + delay - loop.time()))
                await loop.sock_sendall(sock, frame)
                sent += 1
        except OSError as exc:
            raise NetError(f"cannot announce {address} on {dev}: {exc}") from exc
    log.debug("announced %s on %s (%d frames)", address, dev, sent)
    return sent


__all__ = [
    "ANNOUNCE_DELAYS_S",
    "announce",
    "check_service_address",
    "garp_frame",
    "publish",
    "route_to_host",
    "route_to_vm",
    "unpublish",
    "uplink_of",
    "withdraw",
]
