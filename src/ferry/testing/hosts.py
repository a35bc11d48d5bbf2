"""Simulated hosts for migration tests: network namespaces joined by a switch.

::

            ferry-hsw-<tag>  (namespace holding bridge "sw0")
           ┌────────┬────────┬────────┐
          h-a      h-b      h-c        switch-side veth ends (cut_link sets them down)
           │        │        │
          eth0     eth0     eth0       in ferry-host-a / -b / -c
       10.77.0.1 10.77.0.2 10.77.0.3   /24, loopback up, ip_forward=1

Each host is a namespace with one address; processes run "on" a host via
:meth:`HostNamespace.exec_argv`, and a VM lands on a host by passing
``parent=host.namespace`` to :class:`~ferry.net.vmnet.VMNetwork`. Nothing
is routed to the machine's own network: the switch has no uplink, so test
traffic cannot leave the namespaces. Creation is recorded in the run dir
like a VM's network, so a crashed test's hosts are removed by
:func:`~ferry.net.state.cleanup_leftovers`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.net import links, netns
from ferry.net.command import run
from ferry.net.errors import NamespaceError, NetConfigError
from ferry.net.state import DEFAULT_RUN_DIR, OwnerRecord, RunDir, remove_resources

log = logging.getLogger(__name__)

DEFAULT_HOST_SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
SWITCH_BRIDGE = "sw0"
HOST_IFNAME = "eth0"
_HOST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,12}$")


@dataclass(frozen=True, slots=True)
class HostNamespace:
    """One simulated host: a namespace with ``eth0`` at ``address``."""

    name: str
    namespace: str
    address: str
    switch_namespace: str

    @property
    def switch_port(self) -> str:
        """This host's port on the switch (within 15 chars: names are at most 13)."""
        return f"h-{self.name}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` made to run on this host."""
        return netns.netns_exec_argv(self.namespace, argv)

    async def run(self, argv: Sequence[str]) -> str:
        """Run ``argv`` on this host to completion and return its stdout."""
        return await run(self.exec_argv(argv))


class HostSet(Mapping[str, HostNamespace]):
    """The hosts by name, plus link failure controls."""

    def __init__(self, hosts: dict[str, HostNamespace], switch_namespace: str) -> None:
        self._hosts = hosts
        self.switch_namespace = switch_namespace

    def __getitem__(self, name: str) -> HostNamespace:
        return self._hosts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hosts)

    def __len__(self) -> int:
        return len(self._hosts)

    async def cut_link(self, name: str) -> None:
        """Unplug host ``name`` from the switch: its eth0 loses carrier, packets are lost."""
        await links.set_down(self.switch_namespace, self[name].switch_port)

    async def restore_link(self, name: str) -> None:
        """Plug host ``name`` back in."""
        await links.set_up(self.switch_namespace, self[name].switch_port)


def host_namespace_name(name: str) -> str:
    """``ferry-host-<name>``."""
    return f"{netns.PREFIX}host-{name}"


def check_host_names(names: Sequence[str], subnet: ipaddress.IPv4Network) -> None:
    """Distinct, non-empty, ``[a-z0-9-]`` of at most 13 characters, and room in ``subnet``."""
    if not names or len(set(names)) != len(names):
        raise NetConfigError(f"host names must be distinct and non-empty: {list(names)}")
    for n in names:
        if not _HOST_NAME_RE.match(n):
            raise NetConfigError(f"invalid host name {n!r}: use [a-z0-9-], at most 13 chars")
    if len(names) > subnet.num_addresses - 2:
        raise NetConfigError(f"{subnet} has too few addresses for {len(names)} hosts")


@contextlib.asynccontextmanager
async def host_namespaces(
    names: Sequence[str],
    *,
    subnet: ipaddress.IPv4Network = DEFAULT_HOST_SUBNET,
    switch_tag: str = "0",
    run_dir: Path | str = DEFAULT_RUN_DIR,
) -> AsyncIterator[HostSet]:
    """Create hosts ``ferry-host-<name>`` on one switch; remove them all on exit.

    Host ``i`` (in the given order) gets the ``i+1``-th address of ``subnet``.
    """
    check_host_names(names, subnet)
    switch = f"{netns.PREFIX}hsw-{switch_tag}"
    hosts = {
        n: HostNamespace(n, host_namespace_name(n), str(subnet.network_address + i + 1), switch)
        for i, n in enumerate(names)
    }
    for ns in [switch, *(h.namespace for h in hosts.values())]:
        if netns.exists(ns):
            raise NamespaceError("already exists", namespace=ns)
    rd = RunDir(run_dir)
    record = OwnerRecord.for_current_process(
        f"hosts-{switch_tag}", "hosts",
        namespaces=(*(h.namespace for h in hosts.values()), switch),
    )
    async with rd.locked():
        rd.write(record)
    try:
        await netns.create(switch)
        await links.add_bridge(switch, SWITCH_BRIDGE)
        await links.set_up(switch, SWITCH_BRIDGE)
        for h in hosts.values():
            await netns.create(h.namespace)
            await links.add_veth(switch, h.switch_port, HOST_IFNAME, peer_namespace=h.namespace)
            await links.set_master(switch, h.switch_port, SWITCH_BRIDGE)
            await links.set_up(switch, h.switch_port)
            await links.add_address(h.namespace, HOST_IFNAME, f"{h.address}/{subnet.prefixlen}")
            await links.set_up(h.namespace, HOST_IFNAME)
            # So VMs on this host can reach the other hosts through NAT.
            await netns.set_sysctl(h.namespace, "net.ipv4.ip_forward", "1")
        log.info("test hosts up: %s", ", ".join(f"{h.name}={h.address}" for h in hosts.values()))
        yield HostSet(hosts, switch)
    finally:
        await remove_resources(record)
        rd.remove(record.key)
