"""Port forwards from a host address into a VM's namespace: userspace TCP and UDP relays.

A :class:`PortForward` says "``host:host_port`` reaches the guest's
``guest_port``", like ``docker run -p 127.0.0.1:6379:6379``. The forwarder
listens on the host address in the *parent* namespace (the machine, or a
test host's namespace) and relays each connection (TCP) or flow (UDP) to the
VM namespace's veth address, where nftables DNATs it to the guest.

Why a userspace relay rather than nftables DNAT on the host (docker-proxy's
reasoning): it works for 127.0.0.1 without ``route_localnet`` (a host-wide
knob that weakens loopback's isolation), it needs no conntrack state that
would have to move with a migrated VM, and it is a plain object with
``start()``/``stop()`` that a destination host re-creates with the same ports.
The cost is one copy through Python and the guest seeing the veth address
instead of the client's as source. Sockets are created inside the parent
namespace with :func:`~ferry.net.netns.socket_in_netns`, so the relay runs in
ferry's own event loop whatever namespace it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ferry.aio import cancel_and_wait
from ferry.net.errors import ForwardError, NamespaceError, NetConfigError, WildcardAddressError
from ferry.net.netns import socket_in_netns

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 64 * 1024
CLOSE_GRACE_S = 1.0
"""How long a relay's closing end may take to hand its unsent data over."""
UDP_MAX_DATAGRAM_BYTES = 65535
UDP_IDLE_TIMEOUT_S = 30.0
"""A UDP flow with no datagram either way for this long is forgotten, as conntrack does for
unreplied UDP (30 s)."""
UDP_MAX_FLOWS = 1024
"""Caps the upstream sockets one forward may hold, so a client spraying source ports cannot
exhaust descriptors; the least recently used flow is dropped first."""


class Proto(enum.Enum):
    """Transport protocol of a forward."""

    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class PortForward:
    """``host:host_port`` on the host forwards to ``guest_port`` on the guest.

    ``host`` must be a literal IPv4 or IPv6 address; wildcard addresses
    (``0.0.0.0``, ``::``) expose the guest on every interface and are refused
    unless ``allow_wildcard`` is set. ``host_port=0`` picks a free port (read
    it back from the forwarder's ``local_address``).
    """

    host: str
    host_port: int
    guest_port: int
    proto: Proto = Proto.TCP
    allow_wildcard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.proto, str):  # accept "tcp"/"udp" as the brief's examples do
            object.__setattr__(self, "proto", Proto(self.proto))
        try:
            addr = ipaddress.ip_address(self.host)
        except ValueError as exc:
            raise NetConfigError(f"forward host must be an IP address, got {self.host!r}") from exc
        if addr.is_unspecified and not self.allow_wildcard:
            raise WildcardAddressError(
                f"refusing to forward on wildcard address {self.host}: it exposes the guest on "
                "every interface; use --allow-wildcard if that is intended"
            )
        if not 0 <= self.host_port <= 65535:
            raise NetConfigError(f"host_port out of range: {self.host_port}")
        if not 1 <= self.guest_port <= 65535:
            raise NetConfigError(f"guest_port out of range: {self.guest_port}")

    @property
    def family(self) -> socket.AddressFamily:
        """Address family of ``host``."""
        v6 = ipaddress.ip_address(self.host).version == 6
        return socket.AF_INET6 if v6 else socket.AF_INET

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.host_port}->{self.guest_port}/{self.proto.value}"

    def to_json(self) -> list[Any]:
        """``[host, host_port, guest_port, proto, allow_wildcard]`` (records, pipes)."""
        return [self.host, self.host_port, self.guest_port, self.proto.value,
                self.allow_wildcard]

    @classmethod
    def from_json(cls, item: Any) -> PortForward:
        """The forward :meth:`to_json` wrote; ValueError/TypeError or
        :class:`NetConfigError` for anything else."""
        host, host_port, guest_port, proto, allow_wildcard = item
        return cls(str(host), int(host_port), int(guest_port), Proto(proto),
                   allow_wildcard=allow_wildcard is True)


class Forwarder(Protocol):
    """A running forward: bound after ``start()``, everything closed after ``stop()``."""

    forward: PortForward

    @property
    def local_address(self) -> tuple[str, int]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _bind(forward: PortForward, namespace: str | None, type_: int) -> socket.socket:
    try:
        sock = await socket_in_netns(namespace, forward.family, type_)
    except NamespaceError as exc:
        raise ForwardError(str(exc), forward=str(forward)) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if forward.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((forward.host, forward.host_port))
    except OSError as exc:
        sock.close()
        raise ForwardError(f"cannot bind: {exc}", forward=str(forward)) from exc
    return sock


class _ForwarderBase:
    """What both forwarders share: the forward, its target, the bound socket."""

    _proto: Proto

    def __init__(self, forward: PortForward, target: tuple[str, int], *,
                 namespace: str | None = None, gate: asyncio.Event | None = None) -> None:
        if forward.proto is not self._proto:
            raise NetConfigError(f"{forward} is not a {self._proto.value.upper()} forward")
        self.forward = forward
        self.target = target
        self.namespace = namespace
        self._gate = gate
        self._bound: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._log = log.getChild(f"{self._proto.value}.{forward.host_port}")

    @property
    def local_address(self) -> tuple[str, int]:
        """The bound host address (the real port when ``host_port`` was 0)."""
        if self._bound is None:
            raise ForwardError("not started", forward=str(self.forward))
        name = self._bound.getsockname()
        return str(name[0]), int(name[1])

    async def _bind(self, type_: int) -> socket.socket:
        if self._task is not None:
            raise ForwardError("already started", forward=str(self.forward))
        self._bound = await _bind(self.forward, self.namespace, type_)
        return self._bound


class TcpForwarder(_ForwarderBase):
    """Relays TCP connections from ``forward.host:host_port`` to ``target``.

    Half-closes are passed through (a client's shutdown(SHUT_WR) reaches the
    guest as EOF and the reply still comes back). A connection the target
    refuses is closed towards the client. With a ``gate``, accepted clients
    are connected to the target only once the gate is set (the guest runs).
    """

    _proto = Proto.TCP

    async def start(self) -> None:
        """Bind and listen; connections are accepted from now on."""
        listener = await self._bind(socket.SOCK_STREAM)
        listener.listen(128)
        self._task = asyncio.create_task(self._serve(listener), name=f"fwd {self.forward}")
        self._log.debug("listening on %s -> %s", self.local_address, self.target)

    async def stop(self) -> None:
        """Stop listening and close every relayed connection."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._bound is not None:
            self._bound.close()
            self._bound = None

    async def _serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    conn, peer = await loop.sock_accept(listener)
                except OSError as exc:  # e.g. EMFILE: keep serving the others
                    self._log.warning("accept failed: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                tg.create_task(self._relay(conn, peer))

    async def _relay(self, client_sock: socket.socket, peer: object) -> None:
        """Relay one connection; whatever goes wrong stays inside this connection."""
        try:
            await self._relay_unguarded(client_sock, peer)
        except Exception as exc:  # one broken connection must not stop the listener
            self._log.warning("relay for %s failed: %r", peer, exc)
            client_sock.close()

    async def _relay_unguarded(self, client_sock: socket.socket, peer: object) -> None:
        loop = asyncio.get_running_loop()
        if self._gate is not None:
            await self._gate.wait()
        try:
            upstream = await socket_in_netns(self.namespace, socket.AF_INET, socket.SOCK_STREAM)
        except NamespaceError as exc:
            self._log.warning("cannot relay %s: %s", peer, exc)
            client_sock.close()
            return
        try:
            await loop.sock_connect(upstream, self.target)
        except OSError as exc:
            self._log.debug("target %s refused %s: %s", self.target, peer, exc)
            upstream.close()
            client_sock.close()
            return
        c_reader, c_writer = await asyncio.open_connection(sock=client_sock)
        u_reader, u_writer = await asyncio.open_connection(sock=upstream)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pipe(c_reader, u_writer))
                tg.create_task(_pipe(u_reader, c_writer))
        except* OSError as group:
            self._log.debug("relay for %s ended: %s", peer, group.exceptions)
        finally:
            await _close_both(c_writer, u_writer)


async def _close_both(*writers: asyncio.StreamWriter) -> None:
    """Close a relay's two ends. A close waits for unsent data to drain, and the other
    side may never read it again (a guest that was stopped, a client that hung): so a
    relay being torn down (cancelled: the forwarder stops) aborts at once, and any other
    close is given :data:`CLOSE_GRACE_S` before it is aborted."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        for w in writers:
            w.transport.abort()
        return
    for w in writers:
        w.close()
    for w in writers:
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await w.wait_closed()
        except (OSError, TimeoutError):
            w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on as a half-close."""
    while data := await reader.read(COPY_CHUNK_BYTES):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


class _UdpFlow(asyncio.DatagramProtocol):
    """One client's flow: an upstream socket whose replies go back to that client."""

    def __init__(self, reply: asyncio.DatagramTransport, client: tuple[str, int]) -> None:
        self.reply = reply
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.last_used = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.last_used = time.monotonic()
        if not self.reply.is_closing():
            self.reply.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from the guest: UDP has no connection to break.
        log.debug("udp flow %s: %s", self.client, exc)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpForwarder) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.owner._from_client(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp listener %s: %s", self.owner.forward, exc)


class UdpForwarder(_ForwarderBase):
    """Relays UDP datagrams from ``forward.host:host_port`` to ``target``.

    Each client address gets its own upstream socket (a "flow"), so replies
    find their way back to the right client. Flows idle for
    :data:`UDP_IDLE_TIMEOUT_S` are closed. With a ``gate``, flows open (and
    the datagrams that arrived meanwhile are sent) once the gate is set.
    """

    _proto = Proto.UDP

    def __init__(self, forward: PortForward, target: tuple[str, int], *,
                 namespace: str | None = None, idle_timeout_s: float = UDP_IDLE_TIMEOUT_S,
                 gate: asyncio.Event | None = None) -> None:
        super().__init__(forward, target, namespace=namespace, gate=gate)
        self.idle_timeout_s = idle_timeout_s
        self._transport: asyncio.DatagramTransport | None = None
        self._flows: dict[tuple[str, int], _UdpFlow] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._flow_requests: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def start(self) -> None:
        """Bind; datagrams are relayed from now on."""
        sock = await self._bind(socket.SOCK_DGRAM)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpListener(self),
                                                           sock=sock)
        self._transport = transport
        self._task = asyncio.create_task(self._serve(), name=f"fwd {self.forward}")

    async def stop(self) -> None:
        """Close the listener and every flow."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._bound = None  # closed with the transport
        for flow in self._flows.values():
            if flow.transport is not None:
                flow.transport.close()
        self._flows.clear()

    def _from_client(self, data: bytes, client: tuple[str, int]) -> None:
        flow = self._flows.get(client)
        if flow is not None and flow.transport is not None:
            flow.last_used = time.monotonic()
            flow.transport.sendto(data)
        elif client in self._pending:  # the flow's socket is still being opened
            self._pending[client].append(data)
        else:
            self._pending[client] = [data]
            self._flow_requests.put_nowait(client)

    async def _serve(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._open_flows())
            tg.create_task(self._reap_idle())

    async def _open_flows(self) -> None:
        loop = asyncio.get_running_loop()
        if self._gate is not None:
            await self._gate.wait()
        while True:
            client = await self._flow_requests.get()
            try:
                sock = await socket_in_netns(self.namespace, socket.AF_INET, socket.SOCK_DGRAM)
                sock.connect(self.target)
            except (OSError, NamespaceError) as exc:
                self._log.warning("cannot open a flow for %s: %s", client, exc)
                self._pending.pop(client, None)
                continue
            if self._transport is None:
                sock.close()
                return
            try:
                transport, flow = await loop.create_datagram_endpoint(
                    functools.partial(_UdpFlow, self._transport, client), sock=sock)
            except OSError as exc:
                self._log.warning("cannot open a flow for %s: %s", client, exc)
                sock.close()
                self._pending.pop(client, None)
                continue
            if len(self._flows) >= UDP_MAX_FLOWS:
                oldest = min(self._flows, key=lambda k: self._flows[k].last_used)
                self._close_flow(oldest)
            self._flows[client] = flow
            for data in self._pending.pop(client, []):
                transport.sendto(data)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self.idle_timeout_s / 2)
            cutoff = time.monotonic() - self.idle_timeout_s
            for client in [k for k, f in self._flows.items() if f.last_used < cutoff]:
                self._close_flow(client)

    def _close_flow(self, client: tuple[str, int]) -> None:
        flow = self._flows.pop(client, None)
        if flow is not None and flow.transport is not None:
            flow.transport.close()


def make_forwarder(forward: PortForward, target: tuple[str, int], *,
                   namespace: str | None = None,
                   gate: asyncio.Event | None = None) -> TcpForwarder | UdpForwarder:
    """The forwarder for ``forward``'s protocol (``gate``: see the classes)."""
    if forward.proto is Proto.TCP:
        return TcpForwarder(forward, target, namespace=namespace, gate=gate)
    return UdpForwarder(forward, target, namespace=namespace, gate=gate)
