"""Interfaces: veth pairs, tap devices, bridges, addresses, routes, up/down.

Thin async wrappers over ``ip``. Each takes the namespace to act in
(``None`` is the caller's own), so the same calls build a VM's namespace
inside the root namespace or inside a test "host" namespace.
Linux limits interface names to 15 bytes (IFNAMSIZ - 1); names are checked
here so a long one fails with a clear message rather than ``ip``'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from ferry.net.command import run
from ferry.net.errors import NetConfigError
from ferry.net.netns import check_name, ip_argv

IFNAME_MAX = 15
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_ifname(name: str) -> str:
    """Return ``name`` if it is a valid interface name, else raise NetConfigError."""
    if len(name) > IFNAME_MAX or not _IFNAME_RE.match(name):
        raise NetConfigError(f"invalid interface name {name!r} (at most {IFNAME_MAX} chars)")
    return name


async def batch(namespace: str | None, commands: Sequence[str]) -> None:
    """Run ``ip`` commands (without the leading ``ip``) in one ``ip -batch`` process.

    One process instead of one per command: each spawn costs 2-5 ms here, and
    a VM's network is on the resume path. ``ip`` stops at the first failing
    line and names it (``Command failed -:N``) in the error.
    """
    if commands:
        await run(ip_argv(namespace, "-batch", "-"), stdin="".join(f"{c}\n" for c in commands))


def add_veth_commands(name: str, peer: str, *, peer_namespace: str | None = None,
                      peer_mac: str | None = None) -> list[str]:
    """The ``ip`` arguments of :func:`add_veth`."""
    args = ["link", "add", check_ifname(name), "type", "veth", "peer", "name", check_ifname(peer)]
    if peer_mac is not None:
        args += ["address", peer_mac]
    if peer_namespace is not None:
        args += ["netns", check_name(peer_namespace)]
    return args


async def add_veth(
    namespace: str | None, name: str, peer: str, *, peer_namespace: str | None = None,
    peer_mac: str | None = None,
) -> None:
    """Create veth pair ``name`` (in ``namespace``) <-> ``peer`` (in ``peer_namespace``).

    The peer is created directly in its namespace, so no temporary name ever
    appears in the parent, where it could collide.
    """
    await run(ip_argv(namespace, *add_veth_commands(name, peer, peer_namespace=peer_namespace,
                                                     peer_mac=peer_mac)))


async def add_tap(namespace: str | None, name: str, *, owner_uid: int | None = None) -> None:
    """Create a persistent tap device (``ip tuntap add mode tap``).

    Without ``owner_uid`` only root (CAP_NET_ADMIN) may attach to it, which
    is how QEMU runs under ferry; with it, that user's QEMU may open it.
    """
    args = ["tuntap", "add", "dev", check_ifname(name), "mode", "tap"]
    if owner_uid is not None:
        args += ["user", str(owner_uid)]
    await run(ip_argv(namespace, *args))


async def add_bridge(namespace: str | None, name: str, *, mac: str | None = None) -> None:
    """Create a bridge; an explicit ``mac`` stays fixed whatever ports join."""
    args = ["link", "add", check_ifname(name)]
    if mac is not None:
        args += ["address", mac]
    await run(ip_argv(namespace, *args, "type", "bridge"))


async def set_master(namespace: str | None, name: str, bridge: str) -> None:
    """Make ``name`` a port of ``bridge``."""
    await run(ip_argv(namespace, "link", "set", check_ifname(name), "master", check_ifname(bridge)))


async def set_mac(namespace: str | None, name: str, mac: str) -> None:
    """Set an interface's MAC address."""
    await run(ip_argv(namespace, "link", "set", check_ifname(name), "address", mac))


async def set_up(namespace: str | None, name: str) -> None:
    """Bring an interface up."""
    await run(ip_argv(namespace, "link", "set", check_ifname(name), "up"))


async def set_down(namespace: str | None, name: str) -> None:
    """Bring an interface down (its peer, for a veth, loses carrier)."""
    await run(ip_argv(namespace, "link", "set", check_ifname(name), "down"))


async def add_address(namespace: str | None, name: str, cidr: str) -> None:
    """Add ``cidr`` (e.g. ``10.0.2.2/24``) to an interface."""
    await run(ip_argv(namespace, "addr", "add", cidr, "dev", check_ifname(name)))


async def add_default_route(namespace: str | None, via: str) -> None:
    """Route everything not on a connected network via ``via``."""
    await run(ip_argv(namespace, "route", "add", "default", "via", via))


async def delete_link(namespace: str | None, name: str) -> None:
    """Delete an interface if it exists (a veth takes its peer with it)."""
    if await link_exists(namespace, name):
        await run(ip_argv(namespace, "link", "delete", check_ifname(name)), check=False)


async def list_links(namespace: str | None) -> list[dict[str, object]]:
    """``ip -j link show`` as parsed JSON."""
    out = await run(ip_argv(namespace, "-j", "link", "show"))
    data = json.loads(out or "[]")
    return [d for d in data if isinstance(d, dict)]


async def link_names(namespace: str | None) -> set[str]:
    """Names of all interfaces in ``namespace``."""
    return {str(d["ifname"]) for d in await list_links(namespace) if "ifname" in d}


async def link_exists(namespace: str | None, name: str) -> bool:
    """Whether interface ``name`` exists in ``namespace``."""
    return name in await link_names(namespace)


async def ipv4_addresses(namespace: str | None) -> list[str]:
    """Every IPv4 address in ``namespace`` as ``addr/prefix``."""
    return (await names_and_ipv4_addresses(namespace))[1]


async def names_and_ipv4_addresses(namespace: str | None) -> tuple[set[str], list[str]]:
    """(every interface name, every IPv4 address as ``addr/prefix``) from one ``ip`` call."""
    out = await run(ip_argv(namespace, "-j", "addr", "show"))
    names: set[str] = set()
    addresses: list[str] = []
    for link in json.loads(out or "[]"):
        if not isinstance(link, dict):
            continue
        if "ifname" in link:
            names.add(str(link["ifname"]))
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                addresses.append(f"{info['local']}/{info['prefixlen']}")
    return names, addresses
