"""TCP socket options for a link that must notice a dead peer and keep queues short.

A migration that loses its peer must fail, not hang, so that the source can
resume its VM. A killed peer process resets the connection at once, but a
cut cable loses packets silently, so a tuned socket carries
``TCP_USER_TIMEOUT`` (unacknowledged data older than ``dead_peer_s`` kills
the connection) and keepalives (an idle connection is probed every second,
``dead_peer_s`` unanswered probes kill it). Its kernel buffers are bounded:
data queued in them is ahead of any block fetched on demand after the
hand-off.

:func:`~ferry.transport.tcp.connect_tcp` applies a :class:`TcpTuning` before
connecting; :func:`~ferry.transport.tcp.listen_tcp` to the listening sockets
(buffer sizes must be set before the handshake to size the TCP window) and
again to every accepted one.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

from ferry.errors import ConfigError

DEFAULT_DEAD_PEER_S = 3.0
"""A live migration link's tolerance of a silent peer: long enough for a
congested link's retransmissions, short enough that the source resumes its
VM within seconds."""
SOCKET_BUFFER_BYTES = 1024 * 1024
"""Bounded kernel buffers; 1 MiB still fills a data-centre link's
bandwidth-delay product (10 Gbit/s x 0.8 ms)."""


@dataclass(frozen=True, slots=True)
class TcpTuning:
    """Options of one TCP connection (``None`` leaves the kernel's default)."""

    dead_peer_s: float | None = DEFAULT_DEAD_PEER_S
    """Break the connection when the peer is silent this long (user timeout, keepalive)."""
    buffer_bytes: int | None = SOCKET_BUFFER_BYTES
    """SO_SNDBUF and SO_RCVBUF."""

    def __post_init__(self) -> None:
        if self.dead_peer_s is not None and not (
                math.isfinite(self.dead_peer_s) and 0 < self.dead_peer_s <= 3600):
            raise ConfigError(f"dead_peer_s must be in (0, 3600], got {self.dead_peer_s}")
        if self.buffer_bytes is not None and not 4096 <= self.buffer_bytes <= 1 << 30:
            raise ConfigError(f"buffer_bytes must be in [4096, 1 GiB], got {self.buffer_bytes}")


def apply_buffers(sock: socket.socket, tuning: TcpTuning) -> None:
    """Set the buffer sizes (also valid on a listening socket, whose connections inherit them)."""
    if tuning.buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tuning.buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tuning.buffer_bytes)


def apply(sock: socket.socket, tuning: TcpTuning) -> None:
    """Disable Nagle, bound the buffers, and make a dead peer break the connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    apply_buffers(sock, tuning)
    if tuning.dead_peer_s is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, round(tuning.dead_peer_s)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        int(tuning.dead_peer_s * 1000))
