"""A link emulator for simulated hosts: delay, jitter, rate and loss per pair of hosts.

Kernel netem is not built on these machines (of the qdiscs only tbf, htb,
pfifo/bfifo and clsact are), so the emulator is a userspace switch. When a
:class:`~ferry.testing.hosts.HostSet` gets its first :meth:`set_link
<ferry.testing.hosts.HostSet.set_link>`, its switch ports leave the bridge
and this module runs as a process in the switch namespace (``python -m
ferry.testing.linkemu``)::

     host a                 switch namespace                    host b
     eth0 ── veth ── h-a ──► AF_PACKET ─► lane a→b ─► AF_PACKET ──► h-b ── veth ── eth0
                             (learning    loss, queue,
                              switch)     rate, delay

Real frames between real namespaces: each port has one ``AF_PACKET`` socket;
a frame read from port *x* for a MAC learnt on port *y* goes through the
:class:`Lane` *x→y* (broadcasts through every lane out of *x*), which drops it
(random loss, or a full queue) or gives the time it leaves the link. That
time is when a real link would deliver it: after the frames ahead of it are
serialised at ``mbit`` (a FIFO of ``queue_bytes``, tail drop), plus half the
round-trip time, plus jitter. A frame is never delivered before the one ahead
of it on its lane (jitter does not reorder: TCP would read reordering as loss).

Why it keeps up with TCP in Python: the sockets use ``PACKET_VNET_HDR``, so
the relay moves the kernel's GSO frames (up to 64 KiB, one per TSO burst)
whole, with their segmentation offload header, instead of 1500-byte packets:
about 2,000 frames per second carry 1 Gbit/s. Each frame is charged the
bytes it would have on the wire as separate segments (headers repeated per
segment). Loss is drawn per segment, so a GSO frame of *k* segments is lost
with probability ``1 - (1 - loss)^k``, whole; a lossy link therefore also
turns segmentation offload off on the hosts' ``eth0`` (``gso_max_segs 1``)
for connections opened afterwards, so that one loss costs one segment.

The scheduling core (:class:`LinkSpec`, :class:`Lane`) is sans-IO;
:func:`serve` is the socket loop, driven through JSON lines on stdin/stdout
(see :func:`main`); :mod:`ferry.testing.hosts` is its client.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ferry.net.errors import NetConfigError

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
VNET_HDR = struct.Struct("<BBHHHH")
"""``struct virtio_net_hdr``: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""
VNET_HDR_BYTES = VNET_HDR.size
GSO_NONE = 0
ETH_HEADER_BYTES = 14
MAX_FRAME_BYTES = VNET_HDR_BYTES + ETH_HEADER_BYTES + 65536 + 4096
"""A GSO frame is at most 64 KiB of IP packet; room to spare for headers."""
SOCKET_BUFFER_BYTES = 8 * 1024 * 1024
"""Per port, so that a burst of GSO frames waits in the kernel rather than being dropped
there while the relay sleeps between deliveries."""
RX_BATCH_FRAMES = 64
"""Frames read from one port before the others get a turn."""
WAKE_ADVANCE_MAX_S = 0.002
"""Bound of the timer advance (below): waking a sleeping vCPU of this cloud VM costs 0.3 to
0.8 ms, which would add up to 1.6 ms to every round trip if not anticipated."""
WAKE_ADVANCE_GAIN = 0.1
EARLY_S = 0.0002
"""A frame due this soon is sent now rather than after one more sleep: each wake costs a
select() and a context switch, and at 1 Gbit/s frames are due every half millisecond."""
"""Weight of the latest lateness in the advance's running average."""
MIN_QUEUE_BYTES = 256 * 1024
"""The smallest default router buffer: a few GSO frames, so that a short link with no
bandwidth-delay product to speak of does not drop every burst."""


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """What one link between two hosts does to every frame, in each direction.

    The same spec applies to both directions; ``rtt_ms`` is split evenly.
    """

    rtt_ms: float = 0.0
    """Round-trip time the link adds (half each way), on top of the relay's own tens of
    microseconds."""
    mbit: float | None = None
    """Rate of each direction in 10^6 bits per second of wire bytes (every segment with its
    own Ethernet, IP and TCP headers); ``None``: as fast as the relay goes."""
    loss: float = 0.0
    """Probability that a segment is lost, per direction."""
    jitter_ms: float = 0.0
    """Each frame's one-way delay is ``rtt_ms / 2`` plus uniform noise in ±``jitter_ms``
    (never below zero, never overtaking the frame ahead)."""
    queue_bytes: int | None = None
    """The link's buffer, in wire bytes waiting to be serialised; a frame that does not fit
    is dropped (tail drop). ``None``: one bandwidth-delay product, at least
    :data:`MIN_QUEUE_BYTES`. Only used with a rate."""
    seed: int | None = None
    """Seed of the loss and jitter draws (``None``: random)."""

    def __post_init__(self) -> None:
        def bad(what: str) -> NetConfigError:
            return NetConfigError(f"link {what}: {self}")

        if not (math.isfinite(self.rtt_ms) and 0 <= self.rtt_ms <= 10_000):
            raise bad("rtt_ms must be in [0, 10000]")
        mbit = self.mbit
        if mbit is not None and not (math.isfinite(mbit) and 0.01 <= mbit <= 100_000):
            raise bad("mbit must be in [0.01, 100000] or None")
        if not (math.isfinite(self.loss) and 0 <= self.loss < 1):
            raise bad("loss must be in [0, 1)")
        if not (math.isfinite(self.jitter_ms) and 0 <= self.jitter_ms <= 10_000):
            raise bad("jitter_ms must be in [0, 10000]")
        if self.queue_bytes is not None and not 1500 <= self.queue_bytes <= 1 << 30:
            raise bad("queue_bytes must be in [1500, 1 GiB] or None")

    @property
    def is_transparent(self) -> bool:
        """True if the link passes every frame at once."""
        return self.rtt_ms == 0 and self.mbit is None and self.loss == 0 and self.jitter_ms == 0

    @property
    def effective_queue_bytes(self) -> int | None:
        """The buffer in bytes (``None`` without a rate)."""
        if self.mbit is None:
            return None
        if self.queue_bytes is not None:
            return self.queue_bytes
        bdp = self.mbit * 1e6 / 8 * self.rtt_ms / 1e3
        return max(MIN_QUEUE_BYTES, math.ceil(bdp))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LinkSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(obj) - known
        if unknown:
            raise NetConfigError(f"unknown link fields {sorted(unknown)}")
        return cls(**obj)


@dataclass(slots=True)
class LaneStats:
    """What one direction of a link did."""

    frames: int = 0
    """Frames delivered."""
    wire_bytes: int = 0
    """Wire bytes delivered (segments counted with their own headers)."""
    lost: int = 0
    """Frames dropped by random loss."""
    overflowed: int = 0
    """Frames dropped because the queue was full."""
    send_failed: int = 0
    """Frames the outgoing port refused (link cut, kernel buffer full)."""


@dataclass(slots=True)
class Lane:
    """One direction of one link: decides, per frame, drop or the time it arrives.

    Sans-IO: times are plain seconds from any monotonic clock.
    """

    spec: LinkSpec
    rng: random.Random = field(default_factory=random.Random)
    busy_until: float = 0.0
    """When the serialiser finishes the frames already admitted."""
    last_arrival: float = 0.0
    stats: LaneStats = field(default_factory=LaneStats)

    @classmethod
    def for_spec(cls, spec: LinkSpec) -> Lane:
        return cls(spec, random.Random(spec.seed))

    def admit(self, now: float, wire_bytes: int, segments: int = 1) -> float | None:
        """The arrival time of a frame offered at ``now``, or ``None`` if it is dropped."""
        spec = self.spec
        if spec.loss and self.rng.random() >= (1.0 - spec.loss) ** segments:
            self.stats.lost += 1
            return None
        leave = now
        if spec.mbit is not None:
            start = max(now, self.busy_until)
            rate_bytes_s = spec.mbit * 1e6 / 8
            queued = (start - now) * rate_bytes_s
            limit = spec.effective_queue_bytes
            assert limit is not None
            if queued + wire_bytes > limit and queued > 0:
                self.stats.overflowed += 1
                return None
            self.busy_until = leave = start + wire_bytes / rate_bytes_s
        delay_s = spec.rtt_ms / 2e3
        if spec.jitter_ms:
            delay_s = max(0.0, delay_s + self.rng.uniform(-spec.jitter_ms, spec.jitter_ms) / 1e3)
        arrival = max(leave + delay_s, self.last_arrival)
        self.last_arrival = arrival
        return arrival


def wire_size(frame: bytes | memoryview) -> tuple[int, int]:
    """``(wire bytes, segments)`` of ``frame``, read with its virtio-net header in front.

    A GSO frame carries one copy of the headers for ``ceil(payload / gso_size)``
    segments; on a wire each segment has its own (Ethernet, IP, TCP with options).
    """
    frame_bytes = len(frame) - VNET_HDR_BYTES
    _flags, gso_type, _hdr_len, gso_size, csum_start, _off = VNET_HDR.unpack_from(frame)
    if gso_type == GSO_NONE or gso_size == 0:
        return frame_bytes, 1
    header = frame_bytes
    l4 = VNET_HDR_BYTES + csum_start
    if csum_start > 0 and l4 + 12 < len(frame):
        # TCP's data offset (UDP GSO has no such field: 8 bytes, near enough).
        header = csum_start + max(8, (frame[l4 + 12] >> 4) * 4)
    payload = max(0, frame_bytes - header)
    segments = max(1, math.ceil(payload / gso_size))
    return frame_bytes + (segments - 1) * header, segments


# -- the relay ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Port:
    name: str
    host: str
    sock: socket.socket


def _open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, 33, SOCKET_BUFFER_BYTES)  # SO_RCVBUFFORCE
        sock.setsockopt(socket.SOL_SOCKET, 32, SOCKET_BUFFER_BYTES)  # SO_SNDBUFFORCE
        sock.bind((ifname, ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Relay:
    """The switch: ports, learnt MAC addresses, and one :class:`Lane` per direction."""

    def __init__(self, ports: Sequence[tuple[str, str]]) -> None:
        self.ports = [_Port(name, host, _open_port(name)) for name, host in ports]
        self._by_host = {p.host: i for i, p in enumerate(self.ports)}
        self._mac_port: dict[bytes, int] = {}
        self.specs: dict[tuple[int, int], LinkSpec] = {}
        self.lanes: dict[tuple[int, int], Lane] = {}
        self._queues: dict[tuple[int, int], collections.deque[tuple[float, bytes, int]]] = {}
        self._buffer = bytearray(MAX_FRAME_BYTES)
        self._view = memoryview(self._buffer)
        for i in range(len(self.ports)):
            for j in range(len(self.ports)):
                if i != j:
                    self._set(i, j, LinkSpec())

    def close(self) -> None:
        for p in self.ports:
            p.sock.close()

    def _set(self, i: int, j: int, spec: LinkSpec) -> None:
        old = self.lanes.get((i, j))
        lane = Lane.for_spec(spec)
        if old is not None:
            # Frames already in flight keep their times; new ones queue behind them.
            lane.busy_until, lane.last_arrival, lane.stats = (
                old.busy_until, old.last_arrival, old.stats)
        self.specs[(i, j)] = spec
        self.lanes[(i, j)] = lane
        self._queues.setdefault((i, j), collections.deque())

    def set_link(self, a: str, b: str, spec: LinkSpec) -> None:
        """Give the link between hosts ``a`` and ``b`` (both directions) ``spec``."""
        try:
            i, j = self._by_host[a], self._by_host[b]
        except KeyError as exc:
            raise NetConfigError(f"no host {exc.args[0]!r} on this switch") from exc
        if i == j:
            raise NetConfigError(f"a link needs two hosts, not {a!r} twice")
        # Seeds differ per direction, so the two directions do not lose in lockstep.
        back = LinkSpec(**{**spec.to_json(), "seed": None if spec.seed is None else spec.seed + 1})
        self._set(i, j, spec)
        self._set(j, i, back)

    def stats(self) -> dict[str, Any]:
        return {
            f"{self.ports[i].host}>{self.ports[j].host}": asdict(lane.stats)
            for (i, j), lane in self.lanes.items()
        }

    def next_due(self) -> float | None:
        heads = [q[0][0] for q in self._queues.values() if q]
        return min(heads) if heads else None

    def receive(self, index: int) -> None:
        """Read up to a batch of frames from port ``index`` and route them."""
        sock = self.ports[index].sock
        for _ in range(RX_BATCH_FRAMES):
            try:
                n = sock.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the port is down (cut_link) or going away
            if n < VNET_HDR_BYTES + ETH_HEADER_BYTES:
                continue
            frame = bytes(self._view[:n])
            dst = frame[VNET_HDR_BYTES : VNET_HDR_BYTES + 6]
            src = frame[VNET_HDR_BYTES + 6 : VNET_HDR_BYTES + 12]
            if not src[0] & 1:
                self._mac_port[src] = index
            out = self._mac_port.get(dst) if not dst[0] & 1 else None
            if out == index:
                continue
            targets = [out] if out is not None else [
                j for j in range(len(self.ports)) if j != index]
            wire, segments = wire_size(frame)
            now = time.monotonic()
            for j in targets:
                lane = self.lanes[(index, j)]
                if lane.spec.is_transparent and not self._queues[(index, j)]:
                    self._send(lane, j, frame, wire)
                    continue
                at = lane.admit(now, wire, segments)
                if at is not None:
                    self._queues[(index, j)].append((at, frame, wire))

    def deliver_due(self, early_s: float = 0.0) -> None:
        """Send every frame due within ``early_s``."""
        now = time.monotonic() + early_s
        for (i, j), q in self._queues.items():
            while q and q[0][0] <= now:
                _, frame, wire = q.popleft()
                self._send(self.lanes[(i, j)], j, frame, wire)

    def _send(self, lane: Lane, j: int, frame: bytes, wire: int) -> None:
        try:
            self.ports[j].sock.send(frame)
        except OSError:
            lane.stats.send_failed += 1
            return
        lane.stats.frames += 1
        lane.stats.wire_bytes += wire


def _handle_control(relay: Relay, line: str) -> dict[str, Any]:
    try:
        request = json.loads(line)
        op = request.get("op")
        if op == "set":
            relay.set_link(request["a"], request["b"], LinkSpec.from_json(request["spec"]))
            return {"ok": True}
        if op == "stats":
            return {"ok": True, "stats": relay.stats()}
        return {"ok": False, "error": f"unknown op {op!r}"}
    except (ValueError, KeyError, TypeError, NetConfigError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def serve(ports: Sequence[tuple[str, str]]) -> None:
    """Relay frames between ``ports`` (``(ifname, host)``) until stdin closes.

    Control: one JSON object per line on stdin (``{"op": "set", "a": host, "b": host,
    "spec": {...}}`` or ``{"op": "stats"}``), one JSON answer per line on stdout;
    ``{"ready": true}`` is printed once every port is open.
    """
    relay = Relay(ports)
    control = sys.stdin.fileno()
    os.set_blocking(control, False)
    pending = b""
    readers = {p.sock.fileno(): i for i, p in enumerate(relay.ports)}
    fds = [control, *readers]
    print(json.dumps({"ready": True}), flush=True)
    # Timer advance: sleep until `advance_s` before the next frame is due, the running
    # average of how late select() wakes us, and send what is due within it.
    advance_s = 0.0
    try:
        while True:
            due = relay.next_due()
            timeout = None if due is None else max(0.0, due - time.monotonic() - advance_s)
            # select(), not epoll: its timeout has microsecond resolution (epoll's is 1 ms).
            asleep = time.monotonic()
            readable, _, _ = select.select(fds, [], [], timeout)
            if not readable and timeout:
                late = time.monotonic() - asleep - timeout
                advance_s += WAKE_ADVANCE_GAIN * (late - advance_s)
                advance_s = min(max(advance_s, 0.0), WAKE_ADVANCE_MAX_S)
            for fd in readable:
                if fd == control:
                    chunk = os.read(control, 65536)
                    if not chunk:
                        return  # our owner is gone
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        answer = _handle_control(relay, line.decode())
                        print(json.dumps(answer), flush=True)
                else:
                    relay.receive(readers[fd])
            # Within the advance a frame would only be waited for by spinning.
            relay.deliver_due(max(EARLY_S, advance_s))
    finally:
        relay.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ferry's link emulator (one switch namespace)")
    parser.add_argument("--port", action="append", required=True, metavar="IFNAME=HOST",
                        help="a switch port and the host behind it")
    args = parser.parse_args(argv)
    ports = []
    for spec in args.port:
        ifname, sep, host = spec.partition("=")
        if not sep:
            parser.error(f"--port wants IFNAME=HOST, not {spec!r}")
        ports.append((ifname, host))
    with contextlib.suppress(OSError):
        os.nice(-10)  # deliveries on time matter more than the tests' own processes
    serve(ports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
