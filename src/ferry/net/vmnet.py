"""A VM's network: its own namespace, a tap for QEMU, NAT, and host port forwards.

Topology (parent = the machine's namespace, or a test host's)::

    parent namespace                          VM namespace ferry-vm-<id>
    ────────────────                          ──────────────────────────
    forwarder 127.0.0.1:16379 ──┐             DNAT up0:6379 -> 10.0.2.15:6379
                                 │  veth       masquerade 10.0.2.0/24 out of up0
    ferry-v<slot> 172.30.S.1/30 ─┴──────────── ferry-up0 172.30.S.2/30
    table ip ferry_<id>:                       │ (routed, ip_forward=1)
      masquerade 172.30.S.0/30 out             ferry-br0 10.0.2.2/24, MAC 52:54:00:12:34:02
      drop unsolicited inbound                 └── ferry-tap0  <- QEMU, guest 10.0.2.15
                                                                  MAC 52:54:00:12:34:56

Everything the guest can observe (its address, MAC, gateway address and
gateway MAC) is the same for every VM on every host, so a snapshot resumes
anywhere without renumbering; only the /30 "slot" of the veth differs per
parent. Interface names inside the VM namespace are fixed for the same
reason (QEMU's ``ifname=ferry-tap0`` never changes).

Cleanup guarantee: a record listing the namespace(s), the parent-side link
and the parent-side nft table is written to the run dir *before* anything
is created, with this process's pid and start time. Normal exit and
exceptions tear everything down in ``__aexit__``; after a crash the next
:class:`VMNetwork` start (or :func:`cleanup_leftovers`) deletes what the
record lists. The forwarders live in this process and die with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ipaddress
import logging
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from ferry.net import links, netns, nft, service
from ferry.net.errors import (
    AddressPoolExhaustedError,
    NamespaceError,
    NetConfigError,
    NetError,
)
from ferry.net.forward import PortForward, Proto, TcpForwarder, UdpForwarder, make_forwarder
from ferry.net.state import (
    DEFAULT_RUN_DIR,
    OwnerRecord,
    RunDir,
    cleanup_leftovers,
    remove_resources,
)

log = logging.getLogger(__name__)

GUEST_IP = "10.0.2.15"
GUEST_PREFIX_LEN = 24
GATEWAY_IP = "10.0.2.2"
GUEST_SUBNET = "10.0.2.0/24"
"""The same numbers as QEMU's user-mode networking, so images work under either."""
GUEST_MAC = "52:54:00:12:34:56"
GATEWAY_MAC = "52:54:00:12:34:02"
"""Fixed so the guest's ARP entry for its gateway stays valid after a migration."""

TAP_NAME = "ferry-tap0"
BRIDGE_NAME = "ferry-br0"
UPLINK_NAME = "ferry-up0"
GUEST_VETH_NAME = "ferry-gp0"
DEFAULT_LINK_POOL = ipaddress.IPv4Network("172.30.0.0/16")
"""Veth /30s are carved from here; pass another pool if the machine already uses it."""

_VM_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def check_vm_id(vm_id: str) -> str:
    """Lower-case letters, digits and ``-``, at most 40 chars (it names namespaces and tables)."""
    if not _VM_ID_RE.match(vm_id):
        raise NetConfigError(f"invalid VM id {vm_id!r}: use [a-z0-9-], at most 40 chars")
    return vm_id


def vm_namespace_name(vm_id: str) -> str:
    """``ferry-vm-<id>``."""
    return f"{netns.PREFIX}vm-{check_vm_id(vm_id)}"


def guest_namespace_name(vm_id: str) -> str:
    """``ferry-guest-<id>``: the stand-in guest of :class:`NamespaceGuest`."""
    return f"{netns.PREFIX}guest-{check_vm_id(vm_id)}"


def host_link_name(slot: int) -> str:
    """The parent-side veth of slot ``slot`` (``ferry-v<slot>``, within 15 chars)."""
    return f"{netns.PREFIX}v{slot}"


@dataclass(frozen=True, slots=True)
class GuestIdentity:
    """What the guest sees; identical for every VM."""

    ip: str = GUEST_IP
    prefix_len: int = GUEST_PREFIX_LEN
    gateway: str = GATEWAY_IP
    mac: str = GUEST_MAC


class GuestAttachment(Protocol):
    """How the guest's NIC joins the VM namespace's bridge.

    Production uses :class:`TapAttachment` (QEMU opens the tap); tests use
    :class:`NamespaceGuest`, a namespace standing in for the guest.
    """

    def extra_namespaces(self, vm_id: str) -> tuple[str, ...]:
        """Namespaces ``attach`` will create (recorded for cleanup before it runs)."""
        ...

    def bridge_port_commands(self, bridge: str) -> tuple[str, ...]:
        """``ip`` commands (batch syntax) run in the VM namespace right after ``bridge`` is up,
        in the same process; ``attach`` runs after them."""
        ...

    async def attach(self, vm_id: str, vm_ns: str, bridge: str, guest: GuestIdentity) -> None:
        """Create the guest side and make it a port of ``bridge`` in ``vm_ns``."""
        ...


@dataclass(frozen=True, slots=True)
class TapAttachment:
    """A tap device ``ferry-tap0`` in the bridge, for QEMU's ``-netdev tap``.

    ``owner_uid`` lets an unprivileged QEMU open it; by default only root can.
    """

    owner_uid: int | None = None

    def extra_namespaces(self, vm_id: str) -> tuple[str, ...]:
        return ()

    def bridge_port_commands(self, bridge: str) -> tuple[str, ...]:
        owner = f" user {self.owner_uid}" if self.owner_uid is not None else ""
        return (f"tuntap add dev {TAP_NAME} mode tap{owner}",
                f"link set {TAP_NAME} master {links.check_ifname(bridge)}",
                f"link set {TAP_NAME} up")

    async def attach(self, vm_id: str, vm_ns: str, bridge: str, guest: GuestIdentity) -> None:
        return None  # everything happened in bridge_port_commands


@dataclass(frozen=True, slots=True)
class NamespaceGuest:
    """A namespace ``ferry-guest-<id>`` playing the guest (for tests without QEMU).

    Its ``eth0`` has the guest's MAC, address and default route, and is
    joined to the VM's bridge by a veth, exactly where the tap would be.
    """

    def extra_namespaces(self, vm_id: str) -> tuple[str, ...]:
        return (guest_namespace_name(vm_id),)

    def bridge_port_commands(self, bridge: str) -> tuple[str, ...]:
        return ()

    async def attach(self, vm_id: str, vm_ns: str, bridge: str, guest: GuestIdentity) -> None:
        gns = guest_namespace_name(vm_id)
        await netns.create(gns)
        await links.add_veth(vm_ns, GUEST_VETH_NAME, "eth0", peer_namespace=gns,
                             peer_mac=guest.mac)
        await links.set_master(vm_ns, GUEST_VETH_NAME, bridge)
        await links.set_up(vm_ns, GUEST_VETH_NAME)
        await links.add_address(gns, "eth0", f"{guest.ip}/{guest.prefix_len}")
        await links.set_up(gns, "eth0")
        await links.add_default_route(gns, guest.gateway)


class NetState(enum.Enum):
    """Lifecycle of a :class:`VMNetwork`.

    ``CREATED --create_namespace()--> NAMESPACE --connect_uplink()--> UP``
    (``start()`` does both); ``close()`` from any state leads to CLOSED.
    """

    CREATED = "created"
    NAMESPACE = "namespace"
    """The namespace, bridge and guest port (the tap) exist: QEMU may start."""
    UP = "up"
    CLOSED = "closed"


class VMNetwork:
    """Builds a VM's namespace, tap, veth, NAT and forwards; removes all of it on exit.

    ``async with VMNetwork("vm1", forwards=[PortForward("127.0.0.1", 16379, 6379)]) as net:``
    then start QEMU with ``net.wrap_argv([... , *net.qemu_netdev_args()])``.

    ``parent`` is the namespace the VM's veth and forwarders live in (None:
    this process's own); a test host's namespace puts the VM "on" that host.
    ``outbound`` installs masquerading so the guest can open connections out
    through the parent; ferry never turns on ``ip_forward`` in the machine's
    own namespace (that is the operator's decision), only inside namespaces
    it made. With ``clean_leftovers`` (default) a start first removes what
    crashed owners recorded in ``run_dir``.

    Starting in two steps lets QEMU start early: :meth:`create_namespace`
    makes only what QEMU opens (namespace, bridge, tap) and
    :meth:`connect_uplink` the rest (veth, NAT, forwarders), concurrently
    with QEMU's start. With ``hold_forwards`` the forwarders listen from
    ``connect_uplink`` on but connect a client to the guest only after
    :meth:`open_forwards` (call it once the guest runs): an early client
    waits instead of losing its SYN to a tap nobody reads yet.
    """

    def __init__(
        self,
        vm_id: str,
        forwards: Sequence[PortForward] = (),
        *,
        parent: str | None = None,
        outbound: bool = True,
        attachment: GuestAttachment | None = None,
        run_dir: Path | str = DEFAULT_RUN_DIR,
        link_pool: ipaddress.IPv4Network = DEFAULT_LINK_POOL,
        clean_leftovers: bool = True,
        hold_forwards: bool = False,
        service_address: str | None = None,
    ) -> None:
        self.vm_id = check_vm_id(vm_id)
        self.forwards = _checked(forwards)
        self.parent = None if parent is None else netns.check_name(parent)
        self.outbound = outbound
        self.attachment: GuestAttachment = attachment or TapAttachment()
        self.run_dir = RunDir(run_dir)
        if link_pool.prefixlen > 30:
            raise NetConfigError(f"link pool {link_pool} holds no /30")
        self.link_pool = link_pool
        self.clean_leftovers = clean_leftovers
        self.guest = GuestIdentity()
        self.namespace = vm_namespace_name(vm_id)
        self.state = NetState.CREATED
        self.slot: int | None = None
        self.forwarders: tuple[TcpForwarder | UdpForwarder, ...] = ()
        self._forwards_open: asyncio.Event | None = asyncio.Event() if hold_forwards else None
        self.service_address = (None if service_address is None
                                else service.check_service_address(service_address))
        if self.service_address is not None and not self.forwards:
            raise NetConfigError(f"VM {self.vm_id}: a service address serves the guest ports "
                                 "of the VM's forwards, and it has none")
        self._service_dev: str | None = None
        self._announcer: asyncio.Task[int] | None = None
        self._record: OwnerRecord | None = None
        self._log = log.getChild(vm_id)

    # What QEMU and the guest need -------------------------------------------------

    @property
    def tap_name(self) -> str:
        """The tap QEMU opens inside :attr:`namespace`."""
        if not isinstance(self.attachment, TapAttachment):
            raise NetConfigError(f"VM {self.vm_id} has no tap (attachment {self.attachment!r})")
        return TAP_NAME

    @property
    def guest_ip(self) -> str:
        return self.guest.ip

    @property
    def guest_mac(self) -> str:
        return self.guest.mac

    @property
    def gateway_ip(self) -> str:
        return self.guest.gateway

    @property
    def guest_namespace(self) -> str | None:
        """The stand-in guest's namespace with :class:`NamespaceGuest`, else None."""
        extra = self.attachment.extra_namespaces(self.vm_id)
        return extra[0] if isinstance(self.attachment, NamespaceGuest) else None

    def qemu_netdev_args(self, *, netdev_id: str = "net0",
                         device: str = "virtio-net-device") -> list[str]:
        """``-netdev tap,...`` and ``-device`` for the guest NIC (``virtio-net-pci`` on pc/q35)."""
        return ["-netdev", f"tap,id={netdev_id},ifname={self.tap_name},script=no,downscript=no",
                "-device", f"{device},netdev={netdev_id},mac={self.guest_mac}"]

    def guest_kernel_args(self) -> str:
        """Kernel command line words with which ferry's guest init configures the NIC."""
        return f"ferry.ip={self.guest.ip}/{self.guest.prefix_len} ferry.gw={self.guest.gateway}"

    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` made to run inside the VM's namespace."""
        return netns.netns_exec_argv(self.namespace, argv)

    # Addresses ----------------------------------------------------------------------

    def _slot_net(self, slot: int) -> ipaddress.IPv4Network:
        base = int(self.link_pool.network_address) + 4 * slot
        return ipaddress.IPv4Network((base, 30))

    @property
    def link_network(self) -> ipaddress.IPv4Network:
        """The veth's /30: ``.1`` parent side, ``.2`` VM side."""
        if self.slot is None:
            raise NetError(f"VM {self.vm_id} network is not up")
        return self._slot_net(self.slot)

    @property
    def parent_link_ip(self) -> str:
        return str(self.link_network.network_address + 1)

    @property
    def vm_link_ip(self) -> str:
        return str(self.link_network.network_address + 2)

    @property
    def host_link(self) -> str:
        """The parent-side veth name."""
        if self.slot is None:
            raise NetError(f"VM {self.vm_id} network is not up")
        return host_link_name(self.slot)

    @property
    def table(self) -> str:
        """nft table name, the same in the parent and in the VM namespace."""
        return nft.table_name(self.vm_id)

    # Lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> VMNetwork:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        """Create everything; on any failure, remove what was made and re-raise."""
        await self.create_namespace()
        await self.connect_uplink()

    async def create_namespace(self) -> None:
        """Step 1: the namespace, its bridge and the guest's port (QEMU's tap).

        On failure everything made is removed and the error re-raised.
        """
        if self.state is not NetState.CREATED:
            raise NetError(f"VM {self.vm_id} network is {self.state.value}, cannot start")
        if self.clean_leftovers:
            await cleanup_leftovers(self.run_dir)
        if self.parent is not None and not netns.exists(self.parent):
            raise NamespaceError("parent namespace does not exist", namespace=self.parent)
        await self._record_namespaces()
        self.state = NetState.NAMESPACE
        try:
            await self._build_namespace()
        except BaseException:
            await self.close()
            raise

    async def connect_uplink(self) -> None:
        """Step 2: the veth to the parent, NAT, and the port forwarders listening.

        On failure everything made (step 1 included) is removed and the error re-raised.
        """
        if self.state is not NetState.NAMESPACE:
            raise NetError(f"VM {self.vm_id} network is {self.state.value}, "
                           "cannot connect its uplink")
        try:
            await self._reserve_slot()
            self.state = NetState.UP
            await self._build_uplink()
        except BaseException:
            await self.close()
            raise
        self._log.info("network up: ns %s, slot %s, forwards %s", self.namespace, self.slot,
                       ", ".join(map(str, self.forwards)) or "none")

    async def add_forwards(self, forwards: Sequence[PortForward]) -> None:
        """Publish ``forwards`` on a network that came up without any (a warm VM, made
        before anyone asked for it, being claimed): the DNAT rules in the VM's namespace
        (one ``nft`` process) and the forwarders, held like the others until
        :meth:`open_forwards`. On failure the network is removed and the error re-raised.
        """
        if self.state is not NetState.UP or self.forwards:
            raise NetError(f"VM {self.vm_id} network is {self.state.value} with "
                           f"{len(self.forwards)} forwards: cannot add forwards")
        self.forwards = _checked(forwards)
        if not self.forwards:
            return
        try:
            rules = "".join(
                f'add rule ip {self.table} prerouting iifname "{UPLINK_NAME}" {p} dport '
                f"{port} dnat to {self.guest.ip}:{port}\n"
                for p, port in sorted({(f.proto.value, f.guest_port) for f in self.forwards}))
            await nft.load(self.namespace, rules)
            await self._start_forwarders()
        except BaseException:
            await self.close()
            raise

    def open_forwards(self) -> None:
        """Let held forwarders (``hold_forwards=True``) connect clients to the guest."""
        if self._forwards_open is not None:
            self._forwards_open.set()

    def announce_service(self) -> None:
        """The guest runs here: answer ARP for the service address on the host's network
        and announce it (gratuitous ARPs, in the background), so clients send here."""
        if self.service_address is None or self._service_dev is None:
            return
        if self.state is not NetState.UP:
            raise NetError(f"VM {self.vm_id} network is {self.state.value}: "
                           "cannot announce its service address")
        addr, dev, parent = self.service_address, self._service_dev, self.parent

        async def go() -> int:
            await service.route_to_vm(parent, addr, link=self.host_link, via=self.vm_link_ip)
            await service.publish(parent, addr, dev)
            return await service.announce(parent, addr, dev)

        if self._announcer is not None:
            self._announcer.cancel()
        self._announcer = asyncio.create_task(go(), name=f"announce {self.vm_id}")
        self._announcer.add_done_callback(self._announced)

    async def wait_announced(self) -> int:
        """Wait until the last :meth:`announce_service` sent all its frames; their number
        (0 without an announcement). Raises what the announcement raised."""
        return 0 if self._announcer is None else await asyncio.shield(self._announcer)

    def _announced(self, task: asyncio.Task[int]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.warning("announcing the service address failed: %s", exc)

    async def redirect_service(self, host: str) -> None:
        """The guest stopped here and will run on ``host``: route the service address
        there and stop answering ARP for it, so packets in flight follow the VM."""
        if self.service_address is None or self._service_dev is None:
            return
        if self._announcer is not None:
            self._announcer.cancel()
        await service.route_to_host(self.parent, self.service_address, host=host,
                                    dev=self._service_dev)

    async def close(self) -> None:
        """Stop forwarders, delete tables, links and namespaces, forget the record. Idempotent."""
        if self.state not in (NetState.NAMESPACE, NetState.UP):
            self.state = NetState.CLOSED
            return
        self.state = NetState.CLOSED
        for fwd in self.forwarders:
            await fwd.stop()
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError, NetError):
                await self._announcer
        if self.service_address is not None and self._service_dev is not None:
            await service.withdraw(self.parent, self.service_address, self._service_dev)
        if self._record is not None:
            await remove_resources(self._record)
            self.run_dir.remove(self._record.key)
        self._log.info("network removed")

    @property
    def _key(self) -> str:
        return f"vm-{self.vm_id}"

    async def _record_namespaces(self) -> None:
        """Record the namespaces about to be made, under the run-dir lock."""
        async with self.run_dir.locked():
            if (any(r.key == self._key for r in self.run_dir.records())
                    or netns.exists(self.namespace)):
                raise NamespaceError(f"VM {self.vm_id} already has a network",
                                     namespace=self.namespace)
            self._record = OwnerRecord.for_current_process(
                self._key, "vm",
                namespaces=(self.namespace, *self.attachment.extra_namespaces(self.vm_id)),
                parent=self.parent)
            self.run_dir.write(self._record)

    async def _reserve_slot(self) -> None:
        """Pick a free /30 slot in the parent and add it, the parent link and the
        parent's table to the record before any of them exists (under the lock)."""
        assert self._record is not None
        if self.service_address is not None:
            # Before our /32 exists: the host's own way to the address (its network).
            self._service_dev = await service.uplink_of(self.parent, self.service_address)
        async with self.run_dir.locked():
            records = self.run_dir.records()
            used = {r.slot for r in records if r.kind == "vm" and r.parent == self.parent}
            names, addresses = await links.names_and_ipv4_addresses(self.parent)
            present = [ipaddress.IPv4Interface(a).network for a in addresses]
            for slot in range(self.link_pool.num_addresses // 4):
                net = self._slot_net(slot)
                if (slot in used or host_link_name(slot) in names
                        or any(net.overlaps(p) for p in present)):
                    continue
                break
            else:
                raise AddressPoolExhaustedError(f"no free /30 in {self.link_pool}")
            self.slot = slot
            self._record = dataclasses.replace(
                self._record, links=((self.parent, host_link_name(slot)),),
                tables=(nft.TableRef(self.parent, "ip", self.table),), slot=slot,
                extra=self._service_extra())
            self.run_dir.write(self._record)

    def _service_extra(self) -> dict[str, str]:
        if self.service_address is None or self._service_dev is None:
            return {}
        return {"service_address": self.service_address, "service_dev": self._service_dev}

    async def _build_namespace(self) -> None:
        ns = self.namespace
        await netns.create(ns, loopback_up=False)
        g = self.guest
        await links.batch(ns, [
            "link set lo up",
            f"link add {BRIDGE_NAME} address {GATEWAY_MAC} type bridge",
            f"addr add {g.gateway}/{g.prefix_len} dev {BRIDGE_NAME}",
            f"link set {BRIDGE_NAME} up",
            *self.attachment.bridge_port_commands(BRIDGE_NAME),
            # The guest's MAC and address never change, so the gateway needs no ARP:
            # a connection forwarded before the guest runs (or answers ARP) would
            # otherwise wait for the kernel's 1 s ARP retry.
            f"neigh replace {g.ip} lladdr {g.mac} dev {BRIDGE_NAME} nud permanent",
        ])
        await self.attachment.attach(self.vm_id, ns, BRIDGE_NAME, self.guest)

    async def _build_uplink(self) -> None:
        ns, parent = self.namespace, self.parent
        prefix = self.link_network.prefixlen

        async def veth() -> None:
            await links.batch(parent, [
                " ".join(links.add_veth_commands(self.host_link, UPLINK_NAME,
                                                 peer_namespace=ns)),
                f"addr add {self.parent_link_ip}/{prefix} dev {self.host_link}",
                f"link set {self.host_link} up"])
            await links.batch(ns, [
                f"addr add {self.vm_link_ip}/{prefix} dev {UPLINK_NAME}",
                f"link set {UPLINK_NAME} up",
                f"route add default via {self.parent_link_ip}"])
            if self.service_address is not None:
                await service.route_to_vm(parent, self.service_address, link=self.host_link,
                                          via=self.vm_link_ip)

        async def forwarding() -> None:
            if self.outbound and parent is not None:
                await netns.set_sysctl(parent, "net.ipv4.ip_forward", "1")
            elif self.outbound and await netns.get_sysctl(None, "net.ipv4.ip_forward") != "1":
                self._log.warning("net.ipv4.ip_forward is 0 here: the guest's outbound traffic "
                                  "stops at this host until the operator enables it")

        async def service_sysctls() -> None:
            if self._service_dev is not None:
                # Answer ARP for the service address at once: the kernel delays proxy
                # answers to broadcast requests by up to proxy_delay (0.8 s by default).
                await netns.set_sysctl(parent, f"net.ipv4.neigh.{self._service_dev}"
                                       ".proxy_delay", "0")

        # Independent steps (rules only name interfaces), one process each, at once.
        await _concurrently(veth(), nft.load(ns, self._vm_ruleset()),
                            nft.load(parent, self._parent_ruleset()),
                            netns.set_sysctl(ns, "net.ipv4.ip_forward", "1"), forwarding(),
                            service_sysctls())
        await self._start_forwarders()

    async def _start_forwarders(self) -> None:
        started: list[TcpForwarder | UdpForwarder] = []
        self.forwarders = ()
        try:
            for f in self.forwards:
                fwd = make_forwarder(f, (self.vm_link_ip, f.guest_port), namespace=self.parent,
                                     gate=self._forwards_open)
                await fwd.start()
                started.append(fwd)
        finally:
            self.forwarders = tuple(started)

    def _vm_ruleset(self) -> str:
        """DNAT forwarded ports to the guest; masquerade the guest out of the uplink."""
        dnat = sorted({(f.proto.value, f.guest_port) for f in self.forwards})
        lines = [f"table ip {self.table} {{",
                 "  chain prerouting {",
                 "    type nat hook prerouting priority dstnat; policy accept;"]
        lines += [f'    iifname "{UPLINK_NAME}" {p} dport {port} dnat to {self.guest.ip}:{port}'
                  for p, port in dnat]
        lines += ["  }",
                  "  chain postrouting {",
                  "    type nat hook postrouting priority srcnat; policy accept;"]
        if self.outbound:
            lines.append(f'    ip saddr {GUEST_SUBNET} oifname "{UPLINK_NAME}" masquerade')
        lines.append("  }")
        lines += self._service_vm_rules()
        lines += ["  chain forward {",
                  "    type filter hook forward priority filter; policy drop;",
                  "    ct state established,related accept",
                  f'    iifname "{UPLINK_NAME}" oifname "{BRIDGE_NAME}" ct status dnat accept']
        if self.outbound:
            lines.append(f'    iifname "{BRIDGE_NAME}" oifname "{UPLINK_NAME}" accept')
        if self.service_address is not None:
            # Only the service chain's rewritten packets are untracked here.
            lines.append("    ct state untracked accept")
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"

    def _service_ports(self) -> dict[str, str]:
        """The published guest ports per protocol, as nft sets: ``{"tcp": "{ 6379 }"}``."""
        by_proto: dict[str, set[int]] = {}
        for f in self.forwards:
            by_proto.setdefault(f.proto.value, set()).add(f.guest_port)
        return {p: "{ " + ", ".join(map(str, sorted(ports))) + " }"
                for p, ports in sorted(by_proto.items())}

    def _service_vm_rules(self) -> list[str]:
        """The service address rewritten to the guest's and back, statelessly.

        ``notrack`` keeps these packets out of conntrack: the namespace a client's
        connection first crossed holds nothing the namespace on the next host would
        lack, so a mid-stream segment arriving on any host is rewritten the same way.
        The guest's answers to the forwarders (addressed to the parent's veth end) stay
        on the tracked DNAT path of the port forwards.
        """
        svc = self.service_address
        if svc is None:
            return []
        lines = ["  chain service {",
                 "    type filter hook prerouting priority raw; policy accept;"]
        for proto, ports in self._service_ports().items():
            lines.append(f'    iifname "{UPLINK_NAME}" ip daddr {svc} {proto} dport {ports} '
                         f"notrack ip daddr set {self.guest.ip}")
            lines.append(f'    iifname "{BRIDGE_NAME}" ip saddr {self.guest.ip} '
                         f"ip daddr != {self.parent_link_ip} {proto} sport {ports} "
                         f"notrack ip saddr set {svc}")
        lines.append("  }")
        return lines

    def _parent_ruleset(self) -> str:
        """Masquerade the VM's /30 out of the parent; drop unsolicited traffic towards the VM."""
        hl, net = self.host_link, self.link_network
        lines = [f"table ip {self.table} {{",
                 "  chain forward {",
                 "    type filter hook forward priority filter; policy accept;"]
        svc = self.service_address
        if svc is not None:
            # Clients reach the published guest ports at the service address, and the
            # guest's answers leave from it; no NAT here (not masqueraded below).
            for proto, ports in self._service_ports().items():
                lines.append(f'    oifname "{hl}" ip daddr {svc} {proto} dport {ports} accept')
                lines.append(f'    iifname "{hl}" ip saddr {svc} {proto} sport {ports} accept')
        if self.outbound:
            lines.append(f'    iifname "{hl}" accept')
        else:
            lines.append(f'    iifname "{hl}" drop')
        lines += [f'    oifname "{hl}" ct state established,related accept',
                  f'    oifname "{hl}" drop',
                  "  }"]
        if self.outbound:
            lines += ["  chain postrouting {",
                      "    type nat hook postrouting priority srcnat; policy accept;",
                      f'    ip saddr {net} oifname != "{hl}" masquerade',
                      "  }"]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def local_address(self, forward: PortForward) -> tuple[str, int]:
        """Where ``forward`` actually listens (its real port when ``host_port`` was 0)."""
        for fwd in self.forwarders:
            if fwd.forward is forward or fwd.forward == forward:
                return fwd.local_address
        raise NetConfigError(f"{forward} is not a forward of VM {self.vm_id}")


def _checked(forwards: Sequence[PortForward]) -> tuple[PortForward, ...]:
    seen: set[tuple[str, int, Proto]] = set()
    for f in forwards:
        key = (f.host, f.host_port, f.proto)
        if f.host_port and key in seen:
            raise NetConfigError(f"duplicate forward {f}")
        seen.add(key)
    return tuple(forwards)


async def _concurrently(*steps: Coroutine[Any, Any, object]) -> None:
    """Run ``steps`` in a TaskGroup; re-raise the first failure as itself, not as a group
    (callers catch NetCommandError and friends)."""
    try:
        async with asyncio.TaskGroup() as tg:
            for step in steps:
                tg.create_task(step)
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group


__all__ = [
    "GATEWAY_IP",
    "GATEWAY_MAC",
    "GUEST_IP",
    "GUEST_MAC",
    "GuestAttachment",
    "GuestIdentity",
    "NamespaceGuest",
    "NetState",
    "TapAttachment",
    "VMNetwork",
    "cleanup_leftovers",
]
