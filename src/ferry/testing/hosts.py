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

:meth:`HostSet.set_link` gives a pair of hosts a long, slow or lossy link:
the switch then becomes :mod:`ferry.testing.linkemu`, a userspace relay in the
switch namespace (kernel netem is not available; docs/wan.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.net import links, netns
from ferry.net.command import run
from ferry.net.errors import NamespaceError, NetConfigError, NetError
from ferry.net.state import DEFAULT_RUN_DIR, OwnerRecord, RunDir, remove_resources
from ferry.testing.linkemu import LinkSpec

log = logging.getLogger(__name__)

DEFAULT_HOST_SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
SWITCH_BRIDGE = "sw0"
HOST_IFNAME = "eth0"
GSO_MAX_SEGS = 65535
"""The kernel's default ``gso_max_segs``, restored when a link stops losing packets."""
WAN_TCP_BUFFERS = "4096 131072 67108864"
"""``tcp_rmem``/``tcp_wmem`` of hosts on an emulated link: autotuning may grow a
connection's buffers to 64 MiB, enough for the bandwidth-delay product of 1 Gbit/s
at 500 ms (the default 6 MiB/4 MiB caps a 100 ms link at a few hundred Mbit/s),
as a host tuned for long links would be."""
EMULATOR_TIMEOUT_S = 10.0
"""How long the link emulator may take to start or to answer a control request."""
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


class LinkEmulatorError(NetError):
    """The link emulator could not start, or refused or missed a request."""


class LinkEmulator:
    """The relay process of :mod:`ferry.testing.linkemu` in a switch namespace."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, switch_namespace: str, ports: Mapping[str, str]) -> LinkEmulator:
        """Start the relay on ``ports`` (switch port -> host name) and wait until it is ready."""
        argv = [sys.executable, "-m", "ferry.testing.linkemu"]
        for port, host in ports.items():
            argv += ["--port", f"{port}={host}"]
        proc = await asyncio.create_subprocess_exec(
            *netns.netns_exec_argv(switch_namespace, argv),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        emulator = cls(proc)
        try:
            answer = await emulator._read()
            if not answer.get("ready"):
                raise LinkEmulatorError(f"link emulator did not start: {answer}")
        except BaseException:
            await emulator.aclose()
            raise
        return emulator

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout(EMULATOR_TIMEOUT_S):
                line = await self._proc.stdout.readline()
        except TimeoutError as exc:
            raise LinkEmulatorError("link emulator did not answer in time") from exc
        if not line:
            raise LinkEmulatorError(f"link emulator exited ({await self._proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one control request and return the answer; LinkEmulatorError if refused."""
        assert self._proc.stdin is not None
        async with self._lock:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            try:
                await self._proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise LinkEmulatorError("link emulator is gone") from exc
            answer = await self._read()
        if not answer.get("ok"):
            raise LinkEmulatorError(f"link emulator refused {request}: {answer.get('error')}")
        return answer

    async def aclose(self) -> None:
        """Stop the relay (closing its stdin ends it; killed if it lingers)."""
        if self._proc.returncode is not None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            async with asyncio.timeout(2.0):
                await self._proc.wait()
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


class HostSet(Mapping[str, HostNamespace]):
    """The hosts by name, plus link failure controls and emulated links."""

    def __init__(self, hosts: dict[str, HostNamespace], switch_namespace: str) -> None:
        self._hosts = hosts
        self.switch_namespace = switch_namespace
        self._emulator: LinkEmulator | None = None
        self._links: dict[frozenset[str], LinkSpec] = {}

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

    async def set_link(
        self,
        a: str,
        b: str,
        *,
        rtt_ms: float = 0.0,
        mbit: float | None = None,
        loss: float = 0.0,
        jitter_ms: float = 0.0,
        queue_bytes: int | None = None,
        seed: int | None = None,
    ) -> LinkSpec:
        """Make the link between hosts ``a`` and ``b`` behave as given (both directions).

        The first call turns the switch into the link emulator
        (:mod:`ferry.testing.linkemu`; connections open at that moment see a short
        gap). ``loss`` is per segment and direction; on a lossy link ``a`` and ``b``
        stop building GSO frames, for connections opened afterwards. Returns the
        spec applied; :class:`~ferry.net.errors.NetConfigError` for bad values.
        """
        for name in (a, b):
            if name not in self._hosts:
                raise NetConfigError(f"no host {name!r} in this set")
        spec = LinkSpec(rtt_ms=rtt_ms, mbit=mbit, loss=loss, jitter_ms=jitter_ms,
                        queue_bytes=queue_bytes, seed=seed)
        emulator = await self._start_emulator()
        await emulator.request({"op": "set", "a": a, "b": b, "spec": spec.to_json()})
        self._links[frozenset((a, b))] = spec
        for name in (a, b):
            lossy = any(s.loss > 0 for k, s in self._links.items() if name in k)
            segs = "1" if lossy else str(GSO_MAX_SEGS)
            await run(netns.ip_argv(self[name].namespace, "link", "set", HOST_IFNAME,
                                    "gso_max_segs", segs))
        return spec

    async def clear_link(self, a: str, b: str) -> None:
        """Give the link between ``a`` and ``b`` back its defaults (no delay, loss or limit)."""
        await self.set_link(a, b)

    async def link_stats(self) -> dict[str, dict[str, int]]:
        """Per direction (``"a>b"``): frames and wire bytes delivered, frames dropped by
        loss, by a full queue, and refused by the port. Empty without the emulator."""
        if self._emulator is None:
            return {}
        stats: dict[str, dict[str, int]] = (await self._emulator.request({"op": "stats"}))["stats"]
        return stats

    @property
    def link_emulator_pid(self) -> int | None:
        """The relay's process id, once :meth:`set_link` has started it."""
        return None if self._emulator is None else self._emulator.pid

    async def _start_emulator(self) -> LinkEmulator:
        if self._emulator is not None:
            return self._emulator
        ports = {h.switch_port: h.name for h in self._hosts.values()}
        for h in self._hosts.values():
            for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
                await netns.set_sysctl(h.namespace, key, WAN_TCP_BUFFERS)
        # Off the bridge first: a port both bridged and relayed would deliver twice.
        await links.batch(self.switch_namespace, [f"link set {p} nomaster" for p in ports])
        self._emulator = await LinkEmulator.start(self.switch_namespace, ports)
        log.info("link emulator running in %s", self.switch_namespace)
        return self._emulator

    async def aclose(self) -> None:
        """Stop the link emulator, if one runs (the namespaces are the caller's)."""
        if self._emulator is not None:
            emulator, self._emulator = self._emulator, None
            await emulator.aclose()


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


async def build_hosts(switch: str, hosts: Sequence[HostNamespace],
                      subnet: ipaddress.IPv4Network) -> None:
    """Make the switch namespace with its bridge, and each host's namespace with ``eth0``
    at its address, plugged into the switch (the caller recorded them for removal)."""
    await netns.create(switch)
    await links.add_bridge(switch, SWITCH_BRIDGE)
    await links.set_up(switch, SWITCH_BRIDGE)
    for h in hosts:
        await netns.create(h.namespace)
        await links.add_veth(switch, h.switch_port, HOST_IFNAME, peer_namespace=h.namespace)
        await links.set_master(switch, h.switch_port, SWITCH_BRIDGE)
        await links.set_up(switch, h.switch_port)
        await links.add_address(h.namespace, HOST_IFNAME, f"{h.address}/{subnet.prefixlen}")
        await links.set_up(h.namespace, HOST_IFNAME)
        # So VMs on this host can reach the other hosts through NAT.
        await netns.set_sysctl(h.namespace, "net.ipv4.ip_forward", "1")


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
        await build_hosts(switch, list(hosts.values()), subnet)
        log.info("test hosts up: %s", ", ".join(f"{h.name}={h.address}" for h in hosts.values()))
        host_set = HostSet(hosts, switch)
        try:
            yield host_set
        finally:
            await host_set.aclose()
    finally:
        await remove_resources(record)
        rd.remove(record.key)
