"""Measure what a link between two simulated hosts delivers: round-trip time and rate.

Both ends are sockets of this process, opened inside the two hosts'
namespaces (:func:`~ferry.net.netns.socket_in_netns`) and driven by blocking
calls in threads, so the frames cross the real switch (or the link
emulator) between the namespaces.

* :func:`measure_rtt`: a TCP ping-pong of 32-byte messages (``TCP_NODELAY``),
  one at a time; each sample is one round trip.
* :func:`measure_rate`: one TCP connection sends as fast as it can; the
  receiver counts bytes per ``bin_s`` interval. Bins in the first
  ``warmup_s`` (slow start) are left out; the rate is the median of the rest,
  so a scheduler hiccup in one bin does not move it. ``wire_mbit`` converts
  the payload rate to wire bytes (each segment's Ethernet, IP and TCP headers
  counted, as the emulator charges them) with the connection's own MSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from dataclasses import dataclass

from ferry.net import netns
from ferry.testing.hosts import HostSet
from ferry.transport import tuning as tuned
from ferry.transport.tuning import TcpTuning

PING_BYTES = 32
SEND_CHUNK_BYTES = 1024 * 1024
WIRE_HEADER_BYTES = 14 + 20 + 32
"""Ethernet, IPv4 and TCP with the timestamp option (Linux's default): per segment."""
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class RateSample:
    """What :func:`measure_rate` saw."""

    goodput_mbit: float
    """Median payload rate over the steady bins, 10^6 bit/s."""
    wire_mbit: float
    """The same with every segment's headers counted."""
    mss_bytes: int
    bins_mbit: tuple[float, ...]
    """Payload rate of every bin after the warm-up."""


async def tcp_pair(hosts: HostSet, a: str, b: str, buffer_bytes: int | None = None,
                tuning: TcpTuning | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair: (client in ``a``, accepted socket in ``b``), blocking.

    ``buffer_bytes`` sets SO_SNDBUF and SO_RCVBUF on both (before the handshake, which
    fixes the window scale), as :mod:`ferry.transport.tuning` does; ``None`` leaves
    the kernel's autotuning. ``tuning``: the buffers of ferry's VM links instead
    (:func:`~ferry.transport.tuning.apply_buffers` before the handshake,
    :func:`~ferry.transport.tuning.fit` after).
    """
    server = await netns.socket_in_netns(hosts[b].namespace)
    client = await netns.socket_in_netns(hosts[a].namespace)
    try:
        if buffer_bytes is not None:
            for s in (server, client):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        if tuning is not None:
            for s in (server, client):
                tuned.apply_buffers(s, tuning)
        server.setblocking(True)
        server.bind((hosts[b].address, 0))
        server.listen(1)
        port = server.getsockname()[1]
        client.setblocking(True)
        client.settimeout(PROBE_TIMEOUT_S)
        server.settimeout(PROBE_TIMEOUT_S)
        await asyncio.to_thread(client.connect, (hosts[b].address, port))
        accepted, _ = await asyncio.to_thread(server.accept)
        accepted.settimeout(PROBE_TIMEOUT_S)
        if tuning is not None:
            for s in (client, accepted):
                tuned.fit(s, tuning)
    except BaseException:
        client.close()
        raise
    finally:
        server.close()
    return client, accepted


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed during the probe")
        data += chunk
    return data


async def measure_rtt(hosts: HostSet, a: str, b: str, *, samples: int = 30) -> list[float]:
    """``samples`` round trips from ``a`` to ``b`` and back, in milliseconds."""
    client, server = await tcp_pair(hosts, a, b)
    with client, server:
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def echo() -> None:
            for _ in range(samples + 1):
                server.sendall(_recv_exact(server, PING_BYTES))

        def ping() -> list[float]:
            message = bytes(PING_BYTES)
            client.sendall(message)  # the first exchange warms up ARP and the path
            _recv_exact(client, PING_BYTES)
            out = []
            for _ in range(samples):
                start = time.perf_counter()
                client.sendall(message)
                _recv_exact(client, PING_BYTES)
                out.append((time.perf_counter() - start) * 1e3)
            return out

        echoer = asyncio.create_task(asyncio.to_thread(echo))
        try:
            return await asyncio.to_thread(ping)
        finally:
            with contextlib.suppress(OSError):
                await echoer


async def measure_rate(
    hosts: HostSet, a: str, b: str, *, seconds: float = 4.0, warmup_s: float = 1.5,
    bin_s: float = 0.25, buffer_bytes: int | None = None, tuning: TcpTuning | None = None,
) -> RateSample:
    """Bulk TCP from ``a`` to ``b`` for ``warmup_s + seconds``; the steady rate.

    ``buffer_bytes``: fixed socket buffers, ``tuning``: ferry's link-fitted ones (see
    :func:`tcp_pair`), instead of autotuning.
    """
    client, server = await tcp_pair(hosts, a, b, buffer_bytes, tuning)
    with client, server:
        total = warmup_s + seconds
        stop = threading.Event()

        def send() -> None:
            chunk = bytes(SEND_CHUNK_BYTES)
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    client.sendall(chunk)

        def receive() -> list[int]:
            counts = [0] * (int(total / bin_s) + 1)
            buffer = bytearray(SEND_CHUNK_BYTES)
            start = time.perf_counter()
            while (elapsed := time.perf_counter() - start) < total:
                n = server.recv_into(buffer)
                if not n:
                    break
                counts[min(len(counts) - 1, int(elapsed / bin_s))] += n
            stop.set()
            return counts

        sender = asyncio.create_task(asyncio.to_thread(send))
        try:
            counts = await asyncio.to_thread(receive)
            mss = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            await sender
    first, last = int(warmup_s / bin_s), int(total / bin_s)
    bins = tuple(c * 8 / bin_s / 1e6 for c in counts[first:last])
    goodput = statistics.median(bins)
    return RateSample(
        goodput_mbit=goodput,
        wire_mbit=goodput * (mss + WIRE_HEADER_BYTES) / mss,
        mss_bytes=mss,
        bins_mbit=bins,
    )
