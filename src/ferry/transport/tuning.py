"""TCP socket options for a link that must notice a dead peer and keep queues short.

A migration that loses its peer must fail, not hang, so that the source can
resume its VM. A killed peer process resets the connection at once, but a
cut cable loses packets silently, so a tuned socket carries
``TCP_USER_TIMEOUT`` (unacknowledged data older than ``dead_peer_s`` kills
the connection) and keepalives (an idle connection is probed every second,
``dead_peer_s`` unanswered probes kill it). Its kernel buffers are bounded:
data queued in them is ahead of any block fetched on demand after the
hand-off.

A long link needs a bandwidth-delay product in flight (1 Gbit/s x 100 ms =
12.5 MB), which fixed 1 MiB buffers cap at ~114 Mbit/s (docs/wan.md). With
``fit_to_link`` the buffers follow the RTT the handshake measured (and the
rate if known), between 1 and 32 MiB, and ``TCP_NOTSENT_LOWAT`` keeps what is
*queued* short however much is in flight: a message written now waits behind
at most 256 KiB not yet sent.

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
bandwidth-delay product (10 Gbit/s x 0.8 ms). Also the floor of a buffer
fitted to a link (:func:`link_buffer_bytes`)."""
MAX_LINK_BUFFER_BYTES = 32 * 1024 * 1024
"""The ceiling of a socket buffer fitted to a link: 2.6 Gbit/s at 100 ms, 1 Gbit/s at
250 ms. A limit, not an allocation: the kernel charges what is queued, so one link
socket holds at most this much unread (receive) and unacknowledged (send) data."""
ASSUMED_LINK_MBIT = 10_000.0
"""The rate a link is sized for when nobody said (the fastest links issue 15 names):
with it every RTT above 27 ms gets :data:`MAX_LINK_BUFFER_BYTES`. Sizing for a rate
above the real one costs nothing queued: :data:`NOTSENT_LOWAT_BYTES` bounds that."""
NOTSENT_LOWAT_BYTES = 256 * 1024
"""Unsent bytes a link socket queues (``TCP_NOTSENT_LOWAT``): the send buffer may hold a
whole bandwidth-delay product in flight, but a message written now (a fetch answer, the
hand-off) waits behind at most this much not yet sent: 2 ms at 1 Gbit/s, 21 ms at
100 Mbit/s."""
BDP_HEADROOM = 1.25
"""Buffers of 1.25 bandwidth-delay products: the RTT varies, and the receive window is
less than the buffer (the kernel keeps part of it for its own overhead)."""


@dataclass(frozen=True, slots=True)
class TcpTuning:
    """Options of one TCP connection (``None`` leaves the kernel's default)."""

    dead_peer_s: float | None = DEFAULT_DEAD_PEER_S
    """Break the connection when the peer is silent this long (user timeout, keepalive)."""
    buffer_bytes: int | None = SOCKET_BUFFER_BYTES
    """SO_SNDBUF and SO_RCVBUF (ignored with ``fit_to_link``)."""
    fit_to_link: bool = False
    """Size the buffers from the link: :data:`MAX_LINK_BUFFER_BYTES` until the handshake
    (so the window scale allows them), then :func:`link_buffer_bytes` of the RTT the
    handshake measured and ``link_mbit`` (:func:`fit`); unsent data bounded by
    :data:`NOTSENT_LOWAT_BYTES`."""
    link_mbit: float | None = None
    """The link's rate if known (None: :data:`ASSUMED_LINK_MBIT`)."""

    def __post_init__(self) -> None:
        if self.dead_peer_s is not None and not (
                math.isfinite(self.dead_peer_s) and 0 < self.dead_peer_s <= 3600):
            raise ConfigError(f"dead_peer_s must be in (0, 3600], got {self.dead_peer_s}")
        if self.buffer_bytes is not None and not 4096 <= self.buffer_bytes <= 1 << 30:
            raise ConfigError(f"buffer_bytes must be in [4096, 1 GiB], got {self.buffer_bytes}")
        if self.link_mbit is not None and not (
                math.isfinite(self.link_mbit) and 0.1 <= self.link_mbit <= 1_000_000):
            raise ConfigError(f"link_mbit must be in [0.1, 1000000], got {self.link_mbit}")


def link_buffer_bytes(rtt_s: float, mbit: float | None = None) -> int:
    """Socket buffer for a link of ``rtt_s`` and ``mbit`` (None: :data:`ASSUMED_LINK_MBIT`):
    :data:`BDP_HEADROOM` bandwidth-delay products, within [:data:`SOCKET_BUFFER_BYTES`,
    :data:`MAX_LINK_BUFFER_BYTES`]."""
    rate = ASSUMED_LINK_MBIT if mbit is None else mbit
    bdp = rate * 1e6 / 8 * max(rtt_s, 0.0) * BDP_HEADROOM
    if not math.isfinite(bdp):
        return MAX_LINK_BUFFER_BYTES
    return max(SOCKET_BUFFER_BYTES, min(MAX_LINK_BUFFER_BYTES, int(bdp)))


_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
_TCP_NOTSENT_LOWAT = 25
_TCPI_RTT_OFFSET = 68
"""``tcpi_rtt`` (smoothed RTT, microseconds) in ``struct tcp_info`` (linux/tcp.h): 8 bytes
of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans,
fackets, last_data_sent, last_ack_sent, last_data_recv, last_ack_recv, pmtu,
rcv_ssthresh, rtt."""


def set_buffers(sock: socket.socket, nbytes: int) -> None:
    """SO_SNDBUF and SO_RCVBUF of ``nbytes``, above ``net.core.[rw]mem_max`` where this
    process may (CAP_NET_ADMIN: the ``*FORCE`` options), else as far as the limits allow."""
    for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF),
                         (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, nbytes)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, nbytes)


def measured_rtt_s(sock: socket.socket) -> float | None:
    """The kernel's smoothed RTT of a connected TCP socket (None before any sample)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    rtt_us = int.from_bytes(info[_TCPI_RTT_OFFSET:_TCPI_RTT_OFFSET + 4], "little")
    return rtt_us / 1e6 if rtt_us else None


def fit(sock: socket.socket, tuning: TcpTuning) -> int | None:
    """After the handshake: fit the buffers to the measured RTT (``fit_to_link`` only).

    Returns the buffer size set (None: not fitted)."""
    if not tuning.fit_to_link:
        return None
    rtt_s = measured_rtt_s(sock)
    nbytes = MAX_LINK_BUFFER_BYTES if rtt_s is None else link_buffer_bytes(rtt_s, tuning.link_mbit)
    set_buffers(sock, nbytes)
    return nbytes


def apply_buffers(sock: socket.socket, tuning: TcpTuning) -> None:
    """Set the buffer sizes (also valid on a listening socket, whose connections inherit them).

    Fitted to a link, they start at the ceiling: the window scale a connection can use is
    fixed by its handshake, so a window grown later past what it allows would be capped."""
    if tuning.fit_to_link:
        set_buffers(sock, MAX_LINK_BUFFER_BYTES)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    elif tuning.buffer_bytes is not None:
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
