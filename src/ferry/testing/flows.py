"""Client flows that must survive a live migration: a TCP stream and UDP request/response.

The guest side runs in the Redis test guest, which has busybox and nothing else:

* TCP: busybox ``nc -l -p PORT -e tee FILE`` echoes the stream back and keeps a copy
  in the guest, so the bytes are counted and hashed at both ends (the client's sent
  and echoed bytes, and the guest's file, read with ``sha256sum`` through the agent).
* UDP: busybox has no UDP responder, so a 40-line static C program
  (:data:`UDP_ECHO_C`, built with the same ``gcc -static`` as the guest agent) is
  copied into the guest with ``ferry vm exec --stdin``. Its replies carry its own
  count of requests: a count that carries on across a migration shows the same
  process, not a restarted one, answered.

A *reset* is what the client sees when its flow did not survive: a TCP RST or EOF
before the end (``ConnectionResetError``, a short read) or, for UDP, an ICMP
port/host unreachable (``ConnectionRefusedError`` on the connected socket).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ferry.errors import FerryError
from ferry.net.netns import socket_in_netns

UDP_ECHO_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Answer every datagram with "<requests seen so far>:<datagram>". */
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) return 1;
    struct sockaddr_in me;
    memset(&me, 0, sizeof me);
    me.sin_family = AF_INET;
    me.sin_port = htons((unsigned short)atoi(argv[1]));
    if (bind(s, (struct sockaddr *)&me, sizeof me) != 0) return 1;
    unsigned long seen = 0;
    char in[1500], out[1600];
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(s, in, sizeof in, 0, (struct sockaddr *)&peer, &len);
        if (n < 0) continue;
        seen++;
        int head = snprintf(out, 32, "%lu:", seen);
        memcpy(out + head, in, (size_t)n);
        sendto(s, out, (size_t)head + (size_t)n, 0, (struct sockaddr *)&peer, len);
    }
}
"""


def build_udp_echo(work: Path) -> Path:
    """Compile :data:`UDP_ECHO_C` statically into ``work``; the binary's path."""
    src, out = work / "udp-echo.c", work / "udp-echo"
    src.write_text(UDP_ECHO_C)
    try:
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-s", "-o", str(out),
                        str(src)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise FerryError(f"cannot build the UDP echo (gcc and libc6-dev): {exc}") from exc
    return out


def stream_chunk(index: int, size_bytes: int) -> bytes:
    """The ``index``-th chunk of the test stream: deterministic, not compressible."""
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (size_bytes // len(seed) + 1))[:size_bytes]


@dataclass(slots=True)
class StreamResult:
    sent_bytes: int = 0
    sent_sha256: str = ""
    echoed_bytes: int = 0
    echoed_sha256: str = ""
    resets: int = 0
    """Connection resets or an early end: 1 means the connection did not survive."""
    error: str | None = None
    max_stall_ms: float = 0.0
    """The longest time without echoed bytes while the client was sending."""


class TcpStream:
    """One TCP connection from ``namespace`` to ``target``: a paced stream of chunks out,
    its echo read back, both counted and hashed; never reconnects."""

    def __init__(self, target: tuple[str, int], *, namespace: str | None,
                 chunk_bytes: int = 4096, rate_bytes_per_s: int = 256 * 1024) -> None:
        self.target = target
        self.namespace = namespace
        self.chunk_bytes = chunk_bytes
        self.interval_s = chunk_bytes / rate_bytes_per_s
        self.result = StreamResult()
        self._echoed = asyncio.Event()

    async def echoed_at_least(self, count: int) -> None:
        while self.result.echoed_bytes < count:
            if self.result.error is not None:
                raise FerryError(f"the stream failed: {self.result.error}")
            self._echoed.clear()
            await self._echoed.wait()

    async def run(self, stop: asyncio.Event) -> StreamResult:
        """Stream until ``stop``, then half-close and read the echo to its end."""
        r = self.result
        sock = await socket_in_netns(self.namespace, socket.AF_INET, socket.SOCK_STREAM)
        await asyncio.get_running_loop().sock_connect(sock, self.target)
        reader, writer = await asyncio.open_connection(sock=sock)
        sent, echoed = hashlib.sha256(), hashlib.sha256()
        last_echo = time.monotonic()
        sending = True

        async def send() -> None:
            nonlocal sending
            i = 0
            while not stop.is_set():
                chunk = stream_chunk(i, self.chunk_bytes)
                writer.write(chunk)
                await writer.drain()
                sent.update(chunk)
                r.sent_bytes += len(chunk)
                i += 1
                await asyncio.sleep(self.interval_s)
            sending = False
            writer.write_eof()

        async def receive() -> None:
            nonlocal last_echo
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                now = time.monotonic()
                if sending:
                    r.max_stall_ms = max(r.max_stall_ms, (now - last_echo) * 1e3)
                last_echo = now
                echoed.update(data)
                r.echoed_bytes += len(data)
                self._echoed.set()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(send())
                tg.create_task(receive())
        except* OSError as group:
            r.resets += 1
            r.error = repr(group.exceptions[0])
        finally:
            writer.close()
            self._echoed.set()
        if r.error is None and r.echoed_bytes != r.sent_bytes:
            r.resets += 1
            r.error = f"the echo ended after {r.echoed_bytes} of {r.sent_bytes} bytes"
        r.sent_sha256, r.echoed_sha256 = sent.hexdigest(), echoed.hexdigest()
        return r


@dataclass(slots=True)
class UdpResult:
    requests: int = 0
    answered: int = 0
    retries: int = 0
    """Requests sent again after :attr:`UdpPinger.timeout_s` without an answer."""
    resets: int = 0
    """ICMP unreachable answers (ECONNREFUSED) on the connected socket."""
    counts: list[int] = field(default_factory=list)
    """The server's own request count in each answer, in order."""
    max_stall_ms: float = 0.0


class UdpPinger:
    """Request/response over one connected UDP socket from ``namespace``: request ``n``
    is re-sent (as a DNS client would) until its answer arrives."""

    def __init__(self, target: tuple[str, int], *, namespace: str | None,
                 interval_s: float = 0.01, timeout_s: float = 0.2) -> None:
        self.target = target
        self.namespace = namespace
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.result = UdpResult()
        self._answered = asyncio.Event()
        self._ended = False

    async def answered_at_least(self, count: int) -> None:
        while self.result.answered < count:
            if self._ended:
                raise FerryError(f"the UDP flow ended after {self.result.answered} answers")
            self._answered.clear()
            await self._answered.wait()

    async def run(self, stop: asyncio.Event) -> UdpResult:
        try:
            return await self._run(stop)
        finally:
            self._ended = True
            self._answered.set()

    async def _run(self, stop: asyncio.Event) -> UdpResult:
        r = self.result
        loop = asyncio.get_running_loop()
        sock = await socket_in_netns(self.namespace, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await loop.sock_connect(sock, self.target)
            last = time.monotonic()
            n = 0
            while not stop.is_set():
                request = f"req-{n}".encode()
                r.requests += 1
                while True:
                    try:
                        await loop.sock_sendall(sock, request)
                        async with asyncio.timeout(self.timeout_s):
                            answer = await loop.sock_recv(sock, 2048)
                    except TimeoutError:
                        r.retries += 1
                        continue
                    except ConnectionRefusedError:
                        r.resets += 1
                        await asyncio.sleep(self.timeout_s)
                        continue
                    count, _, body = answer.partition(b":")
                    if body == request:
                        break  # else: the late answer to an earlier copy; wait on
                now = time.monotonic()
                r.max_stall_ms = max(r.max_stall_ms, (now - last) * 1e3)
                last = now
                r.answered += 1
                r.counts.append(int(count))
                self._answered.set()
                n += 1
                await asyncio.sleep(self.interval_s)
        return r


__all__ = ["UDP_ECHO_C", "StreamResult", "TcpStream", "UdpPinger", "UdpResult",
           "build_udp_echo", "stream_chunk"]
