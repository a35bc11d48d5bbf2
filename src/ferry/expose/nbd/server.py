"""Asyncio NBD server: serves ferry devices to QEMU, qemu-img, nbdcopy and friends.

The protocol lives in :mod:`ferry.expose.nbd.protocol`; this module moves
bytes between it and a socket and runs requests against devices.

Concurrency. Each listening socket has one background task owning a
``TaskGroup`` of connection tasks; each connection owns a ``TaskGroup`` of
request tasks, so up to :data:`MAX_IN_FLIGHT_REQUESTS` requests (and about
:data:`MAX_IN_FLIGHT_BYTES` of payload) run at once and replies may leave
out of order, as the spec allows. Every connection of an export shares one
:class:`_ExportState`: FLUSH waits for the writes in flight on *any*
connection of the export, then calls ``device.flush()``, which is what makes
advertising NBD_FLAG_CAN_MULTI_CONN honest. FUA is write, then flush.

Failure. A client that breaks the protocol or vanishes only ends its own
connection (logged, never raised to the server); device errors become
NBD error replies. Cancellation is never swallowed.

The sockets are plain non-blocking sockets driven with ``loop.sock_recv_into``
and ``sendmsg``: the receive path reads a WRITE's payload straight into its
final buffer and the send path frames a READ's data without copying it.
Devices backed by a file (see :mod:`ferry.expose.nbd.filereads`) skip
``read_at``: small reads are ``pread`` inline in the receive loop and their
replies leave batched in one ``sendmsg``; large ones go out with
``sendfile``. Every write to the socket holds the connection's send lock, so
one reply's bytes never interleave with another's.

Backpressure. A request's share of the in-flight budget is given back only
once its reply has been sent, so a client that stops reading replies stops
the server reading its requests: a connection holds at most about
:data:`MAX_IN_FLIGHT_BYTES` of replies, however many requests it sends.

Hostile clients. The handshake (options, TLS) must finish within
:data:`HANDSHAKE_TIMEOUT_S`, and at most :data:`MAX_HANDSHAKING` connections
may be in their handshake at once (the accept loop waits for a slot, so
further clients queue in the kernel's backlog). After the handshake there is
no idle deadline: QEMU leaves an idle disk's connection silent for hours.

TLS. ``serve_tcp(..., ssl_context=ctx)`` makes every connection TLS-only
(the spec's FORCEDTLS): the client must send NBD_OPT_STARTTLS before any
other option, and after the ACK the socket is driven through a
:class:`~ferry.expose.nbd.tlschannel.TLSChannel`. Under TLS large READs
take ``read_at``/``pread`` instead of ``sendfile``. Plaintext TCP, which any
local user can reach, must be asked for with ``insecure=True``. UNIX sockets
stay plaintext: the socket file is created mode 0600 (``mode=`` to widen it
for a group), so only its owner (and root) can connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from ferry.buffers import Buffer
from ferry.errors import DeviceError, DeviceRangeError, ReadOnlyError
from ferry.expose.nbd.errors import (
    NBDError,
    NBDHandshakeTimeoutError,
    NBDServeError,
    NBDTLSError,
)
from ferry.expose.nbd.filereads import (
    INLINE_READ_MAX_BYTES,
    FileExtent,
    file_extent_of,
    pread_exact,
    sendfile_all,
)
from ferry.expose.nbd.protocol import (
    MAX_PAYLOAD_BYTES,
    CacheRequest,
    CommandFlag,
    DisconnectRequest,
    Errno,
    ExportInfo,
    ExportSelected,
    FlushRequest,
    HandshakeAborted,
    OptionReceived,
    ReadRequest,
    RejectedRequest,
    Request,
    ServerConnection,
    Signal,
    TLSMode,
    TLSRequested,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)
from ferry.expose.nbd.tlschannel import TLSChannel
from ferry.storage.device import Device

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT_REQUESTS = 16
"""Requests of one connection processed at once. QEMU keeps up to 16 in
flight per connection (MAX_NBD_REQUESTS), so this never throttles it."""

MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
"""Payload bytes one connection may hold in flight before we stop reading
its requests: bounds memory at about this plus one maximal request."""

_ZERO_CHUNK_BYTES = 1024 * 1024
_ZEROES = bytes(_ZERO_CHUNK_BYTES)
"""WRITE_ZEROES is written in chunks of one shared zero buffer, so a 4 GiB
request costs 1 MiB of memory."""

_BATCH_MAX_BYTES = 1024 * 1024
_BATCH_MAX_BUFFERS = 512
"""Bounds on the inline read replies gathered for one sendmsg: memory, and
the kernel's limit of 1024 buffers per call (IOV_MAX)."""

TLS_HANDSHAKE_TIMEOUT_S = 10.0
"""A client that stalls its TLS handshake longer than this is dropped, so
half-open handshakes cannot pin connections forever."""

HANDSHAKE_TIMEOUT_S = 10.0
"""The whole handshake (options, TLS included) must finish within this: QEMU
and nbd clients need milliseconds; an idle connection is dropped."""

MAX_HANDSHAKING = 32
"""Connections in their handshake at once; more wait in the listen backlog."""

SOCKET_MODE = 0o600

_LISTEN_BACKLOG = 128
_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Export:
    """A device offered under a name; ``read_only`` refuses writes with EPERM."""

    device: Device
    read_only: bool = False
    description: str = ""
    block_size_bytes: int = 4096

    def info(self) -> ExportInfo:
        return ExportInfo(
            size_bytes=self.device.size_bytes,
            read_only=self.read_only,
            description=self.description,
            block_size_bytes=self.block_size_bytes,
        )


@dataclass(slots=True)
class _ExportState:
    """What all connections of one export share: the writes in flight."""

    export: Export
    writes_in_flight: set[asyncio.Future[None]] = field(default_factory=set)
    file_extent: FileExtent | None = None
    """The device's ``file_extent`` capability, if it has one (see filereads)."""
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("reads", "read_bytes", "writes", "write_bytes", "flushes"), 0))
    """Requests received on every connection (:meth:`NBDServer.counters`)."""

    def count(self, request: object) -> None:
        c = self.counters
        if type(request) is ReadRequest:
            c["reads"] += 1
            c["read_bytes"] += request.length
        elif isinstance(request, WriteRequest | WriteZeroesRequest):
            c["writes"] += 1
            c["write_bytes"] += request.length
        elif isinstance(request, FlushRequest):
            c["flushes"] += 1

    def __post_init__(self) -> None:
        self.file_extent = file_extent_of(self.export.device)

    async def wait_for_writes(self) -> None:
        """Wait for every write in flight now (on any connection) to finish."""
        pending = set(self.writes_in_flight)
        if pending:
            # asyncio.wait, unlike gather, never cancels what it waits for.
            await asyncio.wait(pending)


class _ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes a connection's tag; an adapter rather than a child logger per
    connection because loggers are never freed and connections are unbounded."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[{self.extra['conn'] if self.extra else '?'}] {msg}", kwargs


class _Budget:
    """Bounds the requests and payload bytes one connection has in flight."""

    def __init__(self) -> None:
        self._requests = 0
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def has_room(self) -> bool:
        return self._room.is_set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def take(self, nbytes: int) -> None:
        self._requests += 1
        self._bytes += nbytes
        if self._requests >= MAX_IN_FLIGHT_REQUESTS or self._bytes >= MAX_IN_FLIGHT_BYTES:
            self._room.clear()

    def give(self, nbytes: int) -> None:
        self._requests -= 1
        self._bytes -= nbytes
        if self._requests < MAX_IN_FLIGHT_REQUESTS and self._bytes < MAX_IN_FLIGHT_BYTES:
            self._room.set()


def _request_bytes(request: Request) -> int:
    if isinstance(request, ReadRequest | WriteRequest):
        return request.length
    return 0


class _Connection:
    """One client socket: handshake, then requests run concurrently."""

    def __init__(
        self,
        server: NBDServer,
        sock: socket.socket,
        log: logging.LoggerAdapter,  # type: ignore[type-arg]
        ssl_context: ssl.SSLContext | None = None,
        handshake_done: Callable[[], None] = lambda: None,
    ) -> None:
        self._server = server
        self._handshake_done = handshake_done
        self._sock = sock
        self._sock_fd = sock.fileno()
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self._ssl_context = ssl_context
        self._tls: TLSChannel | None = None
        mode = TLSMode.NONE if ssl_context is None else TLSMode.REQUIRED
        self._core = ServerConnection(server.catalogue, tls=mode)
        self._budget = _Budget()
        self._trace = log.isEnabledFor(logging.DEBUG)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._tls is not None:
                await self._tls.close()

    async def _run(self) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await self._send([self._core.data_to_send()])
                selected = await self._handshake()
        except TimeoutError:
            raise NBDHandshakeTimeoutError(
                f"handshake not finished within {HANDSHAKE_TIMEOUT_S:g} s"
            ) from None
        finally:
            self._handshake_done()
        if selected is None:
            return
        state = self._server.export_state(selected.name)
        self._log.info(
            "export %r selected (structured replies %s)",
            selected.name,
            "on" if selected.structured_replies else "off",
        )
        # Replies to small reads served inline from a file, sent together in
        # one sendmsg when we run out of parsed requests (or it grows large).
        batch: list[Buffer] = []
        batch_bytes = 0
        async with asyncio.TaskGroup() as requests:
            while True:
                if not self._budget.has_room():
                    if batch:
                        await self._send(batch)
                        batch, batch_bytes = [], 0
                    await self._budget.wait_for_room()
                event = self._core.next_event()
                if event is Signal.NEED_DATA:
                    if batch:
                        await self._send(batch)
                        batch, batch_bytes = [], 0
                    await self._receive()
                    continue
                if event is Signal.CLOSED or isinstance(event, DisconnectRequest):
                    if batch:
                        await self._send(batch)
                    # Leaving the TaskGroup finishes outstanding requests first,
                    # as NBD_CMD_DISC requires.
                    self._log.debug("--> disconnect")
                    break
                assert not isinstance(
                    event, OptionReceived | ExportSelected | HandshakeAborted | TLSRequested
                )
                if self._trace:
                    self._log.debug("--> %s", _describe(event))
                state.count(event)
                if (
                    type(event) is ReadRequest
                    and event.length <= INLINE_READ_MAX_BYTES
                    and state.file_extent is not None
                ):
                    reply = self._read_inline(event, state.file_extent)
                    if reply is not None:
                        batch += reply
                        batch_bytes += event.length
                        if batch_bytes >= _BATCH_MAX_BYTES or len(batch) >= _BATCH_MAX_BUFFERS:
                            await self._send(batch)
                            batch, batch_bytes = [], 0
                        continue
                nbytes = _request_bytes(event)
                self._budget.take(nbytes)
                requests.create_task(self._serve_request(event, state, nbytes))

    async def _receive(self) -> None:
        if self._tls is not None:
            n = await self._tls.recv_into(self._core.get_buffer())
        else:
            n = await self._loop.sock_recv_into(self._sock, self._core.get_buffer())
        if n:
            self._core.buffer_updated(n)
        else:
            self._core.receive_eof()

    async def _handshake(self) -> ExportSelected | None:
        while True:
            event = self._core.next_event()
            out = self._core.data_to_send()
            if isinstance(event, HandshakeAborted):
                self._log.debug("--> option ABORT")
                # The client may hang up without reading the ACK; that is fine.
                with contextlib.suppress(OSError):
                    await self._send([out])
                return None
            if out:
                await self._send([out])
            if event is Signal.NEED_DATA:
                await self._receive()
            elif event is Signal.CLOSED:
                self._log.debug("client left during the handshake")
                return None
            elif isinstance(event, OptionReceived):
                self._log.debug("--> option %d (%d bytes)", event.option, event.length)
            elif isinstance(event, TLSRequested):
                await self._start_tls()
            elif isinstance(event, ExportSelected):
                return event
            else:  # pragma: no cover - the core emits no requests before transmission
                raise AssertionError(f"unexpected event {event!r} in the handshake")

    async def _start_tls(self) -> None:
        """Upgrade to TLS after the ACK to NBD_OPT_STARTTLS went out."""
        assert self._ssl_context is not None  # the core asks only in REQUIRED mode
        self._log.debug("--> option STARTTLS")
        tls = TLSChannel(self._sock, self._ssl_context)
        try:
            async with asyncio.timeout(TLS_HANDSHAKE_TIMEOUT_S):
                await tls.handshake(self._core.take_unparsed())
        except TimeoutError as exc:
            raise NBDTLSError(
                f"TLS handshake not finished after {TLS_HANDSHAKE_TIMEOUT_S} s"
            ) from exc
        self._core.tls_established()
        self._tls = tls
        self._log.info("TLS established (%s, client %s)", tls.version, tls.peer_subject())

    def _read_inline(self, request: ReadRequest, file_extent: FileExtent) -> list[Buffer] | None:
        """Answer a small READ with ``pread`` now; ``None`` leaves it to ``read_at``.

        Any failure (out of range, closed device, I/O error, short file) takes
        the ``read_at`` path, which turns it into the right error reply.
        """
        try:
            extent = file_extent(request.offset, request.length)
            if extent is None:
                return None
            data = pread_exact(extent[0], request.length, extent[1])
        except (DeviceError, OSError):
            return None
        if data is None:
            return None
        if self._trace:
            self._log.debug("<-- reply handle=%#x bytes=%d (inline)", request.handle, len(data))
        return [self._core.reply_read(request, data), data]

    async def _serve_request(self, request: Request, state: _ExportState, nbytes: int) -> None:
        # The budget comes back only once the reply is out: a client that does
        # not read its replies stops us reading its requests (module docstring).
        try:
            # Small reads come here only when the inline pread failed: read_at
            # then reports what went wrong.
            if (
                type(request) is ReadRequest
                and request.length > INLINE_READ_MAX_BYTES
                and state.file_extent is not None
                and self._tls is None  # sendfile would bypass TLS
                and await self._send_read_from_file(request, state.file_extent)
            ):
                return
            reply = await self._execute(request, state)
            if self._trace:
                self._log.debug("<-- %s", _describe_reply(request, reply))
            await self._send(reply)
        finally:
            self._budget.give(nbytes)

    async def _execute(self, request: Request, state: _ExportState) -> list[Buffer]:
        """Run ``request`` against the device; return the reply to send."""
        core = self._core
        if isinstance(request, RejectedRequest):
            return [core.reply_error(request, request.error, request.message)]
        device = state.export.device
        try:
            if isinstance(request, ReadRequest):
                data = await device.read_at(request.offset, request.length)
                return [core.reply_read(request, data), data]
            if isinstance(request, WriteRequest | WriteZeroesRequest):
                await self._write(request, state)
            elif isinstance(request, FlushRequest):
                await state.wait_for_writes()
                await device.flush()
            # TRIM is a hint the spec lets a server ignore (a Device has no
            # discard), and CACHE only asks to prefetch: both succeed as no-ops.
            elif not isinstance(request, TrimRequest | CacheRequest):  # pragma: no cover
                raise AssertionError(f"unhandled request {request!r}")
        except ReadOnlyError as exc:
            return [core.reply_error(request, Errno.EPERM, str(exc))]
        except DeviceRangeError as exc:
            writes = isinstance(request, WriteRequest | WriteZeroesRequest)
            return [core.reply_error(request, Errno.ENOSPC if writes else Errno.EINVAL, str(exc))]
        except DeviceError as exc:
            self._log.warning("device error on %s: %s", _describe(request), exc)
            return [core.reply_error(request, Errno.EIO, str(exc))]
        except Exception as exc:  # a bug in a device must not take the connection down
            self._log.exception("unexpected error on %s", _describe(request))
            return [core.reply_error(request, Errno.EIO, f"internal error: {exc}")]
        return [core.reply_done(request)]

    async def _write(self, request: WriteRequest | WriteZeroesRequest, state: _ExportState) -> None:
        device = state.export.device
        done: asyncio.Future[None] = self._loop.create_future()
        state.writes_in_flight.add(done)
        try:
            if isinstance(request, WriteRequest):
                await device.write_at(request.offset, request.data)
                # Like io.WriterAt, a device does not keep ``data`` after
                # write_at returns, so the buffer can take the next write.
                self._core.recycle(request.data)
            else:
                end = request.offset + request.length
                for pos in range(request.offset, end, _ZERO_CHUNK_BYTES):
                    n = min(_ZERO_CHUNK_BYTES, end - pos)
                    await device.write_at(pos, memoryview(_ZEROES)[:n])
        finally:
            state.writes_in_flight.discard(done)
            done.set_result(None)
        if request.flags & CommandFlag.FUA:
            await device.flush()

    async def _send_read_from_file(self, request: ReadRequest, file_extent: FileExtent) -> bool:
        """Answer ``request`` with ``sendfile``; ``False`` leaves it to ``read_at``.

        The range is checked (and the extent looked up) before the header
        goes out, so every error the device would report still gets a proper
        error reply; only a file that shrinks under us mid-reply drops the
        connection (:class:`NBDReplyAbortedError`).
        """
        try:
            extent = file_extent(request.offset, request.length)
        except DeviceError:
            return False
        if extent is None or request.length == 0:
            return False
        fd, file_offset = extent
        header = self._core.reply_read_header(request)
        async with self._send_lock:
            await self._send_unlocked([memoryview(header)])
            await sendfile_all(self._loop, self._sock_fd, fd, file_offset, request.length)
        if self._trace:
            self._log.debug(
                "<-- reply handle=%#x bytes=%d (sendfile)", request.handle, request.length
            )
        return True

    async def _send(self, buffers: list[Buffer]) -> None:
        """Send ``buffers`` back to back; replies never interleave."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        async with self._send_lock:
            await self._send_unlocked(views)

    async def _send_unlocked(self, views: list[memoryview]) -> None:
        """Send ``views`` back to back; the caller holds the send lock."""
        if self._tls is not None:
            await self._tls.send(views)
            return
        try:
            sent = self._sock.sendmsg(views)
        except BlockingIOError:
            sent = 0
        for view in views:
            if sent >= len(view):
                sent -= len(view)
                continue
            await self._loop.sock_sendall(self._sock, view[sent:])
            sent = 0


def _describe(request: Request | DisconnectRequest) -> str:
    if isinstance(request, WriteRequest):
        return f"WRITE handle={request.handle:#x} offset={request.offset} length={request.length}"
    if isinstance(request, FlushRequest | DisconnectRequest):
        return repr(request)
    name = type(request).__name__.removesuffix("Request").upper()
    return f"{name} handle={request.handle:#x} offset={request.offset} length={request.length}"


def _describe_reply(request: Request, reply: list[Buffer]) -> str:
    size = sum(len(memoryview(b).cast("B")) for b in reply)
    handle = getattr(request, "handle", 0)
    return f"reply handle={handle:#x} bytes={size}"


class NBDServer:
    """Serves named exports over UNIX or TCP sockets.

    Use ``async with server.serve_unix(path) as address:`` (or ``serve_tcp``):
    the socket is bound and listening when the block starts, clients are
    served in the background, and leaving the block stops accepting, ends
    every connection and removes the socket file.
    """

    def __init__(self, exports: Mapping[str, Export]) -> None:
        for name in exports:
            if len(name.encode()) > 4096:
                raise ValueError(f"export name {name[:40]!r}... longer than 4096 bytes")
        self._states = {name: _ExportState(export) for name, export in exports.items()}
        self.catalogue: Mapping[str, ExportInfo] = {
            name: export.info() for name, export in exports.items()
        }
        self._conn_ids = itertools.count(1)
        if MAX_PAYLOAD_BYTES > MAX_IN_FLIGHT_BYTES:  # pragma: no cover - constants
            raise AssertionError("a maximal request must fit the in-flight budget")

    def export_state(self, name: str) -> _ExportState:
        return self._states[name]

    def counters(self) -> dict[str, dict[str, int]]:
        """Per export: reads, writes (and their bytes) and flushes received so far."""
        return {name: dict(state.counters) for name, state in self._states.items()}

    @contextlib.asynccontextmanager
    async def serve_unix(
        self, path: str | os.PathLike[str], *, mode: int = SOCKET_MODE
    ) -> AsyncIterator[str]:
        """Listen on a UNIX socket at ``path`` (file mode ``mode``, set before
        listening); yields the path once listening."""
        address = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            os.chmod(address, mode)
        except OSError as exc:
            sock.close()
            raise NBDServeError(f"cannot bind: {exc.strerror}", address=address) from exc
        try:
            async with self._serving(sock, address):
                yield address
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)

    @contextlib.asynccontextmanager
    async def serve_tcp(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        insecure: bool = False,
    ) -> AsyncIterator[tuple[str, int]]:
        """Listen on TCP ``host:port`` (0 picks a free port); yields the bound address.

        With ``ssl_context`` (a server context, such as
        :func:`ferry.transport.tls.server_context`, which also demands a
        client certificate from its CA) every client must upgrade with
        NBD_OPT_STARTTLS before anything else. Plaintext, which lets any
        local user read and write the exports, needs ``insecure=True``.
        """
        if ssl_context is not None and ssl_context.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError("ssl_context is a client context; NBD needs a server one")
        if ssl_context is None and not insecure:
            raise NBDServeError(
                "plaintext NBD over TCP lets any local user at the exports: "
                "give an ssl_context, or insecure=True",
                address=f"{host}:{port}",
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise NBDServeError(f"cannot bind: {exc.strerror}", address=f"{host}:{port}") from exc
        bound = sock.getsockname()
        async with self._serving(sock, f"{bound[0]}:{bound[1]}", ssl_context):
            yield bound[0], bound[1]

    @contextlib.asynccontextmanager
    async def _serving(
        self, sock: socket.socket, address: str, ssl_context: ssl.SSLContext | None = None
    ) -> AsyncIterator[None]:
        # The accept loop runs in its own task rather than a TaskGroup around
        # the ``yield``: a TaskGroup there would wrap every exception of the
        # caller's block in an ExceptionGroup. The task is always awaited here.
        try:
            sock.listen(_LISTEN_BACKLOG)
            sock.setblocking(False)
            task = asyncio.create_task(
                self._accept_loop(sock, ssl_context), name=f"nbd-accept {address}"
            )
        except BaseException:
            sock.close()
            raise
        logger.info(
            "NBD server listening on %s%s (exports: %s)",
            address,
            " with TLS required" if ssl_context is not None else "",
            ", ".join(self._states),
        )
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            finally:
                sock.close()
                logger.info("NBD server on %s stopped", address)

    async def _accept_loop(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        handshaking = asyncio.Semaphore(MAX_HANDSHAKING)
        async with asyncio.TaskGroup() as connections:
            while True:
                await handshaking.acquire()
                try:
                    client, _ = await loop.sock_accept(sock)
                except OSError as exc:
                    handshaking.release()
                    # Out of descriptors or a client that reset before accept:
                    # keep serving the others.
                    logger.warning("accept failed: %s", exc)
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        await asyncio.sleep(0.1)
                    continue
                client.setblocking(False)
                # A 1 MiB read reply then leaves in one sendmsg instead of
                # five rounds through the event loop (capped at wmem_max).
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
                connections.create_task(
                    self._serve_client(client, ssl_context, _once(handshaking.release))
                )

    async def _serve_client(
        self,
        sock: socket.socket,
        ssl_context: ssl.SSLContext | None,
        handshake_done: Callable[[], None],
    ) -> None:
        """Serve one client until it leaves; never raises except cancellation."""
        conn_id = next(self._conn_ids)
        log = _ConnectionLog(logger, {"conn": f"conn{conn_id}"})
        log.debug("connected")
        try:
            await _Connection(self, sock, log, ssl_context, handshake_done).run()
        except* NBDError as group:
            log.info("dropping client: %s", "; ".join(str(e) for e in group.exceptions))
        except* OSError as group:
            log.info("client went away: %s", "; ".join(str(e) for e in group.exceptions))
        except* Exception:
            log.exception("connection failed")
        finally:
            handshake_done()
            sock.close()
            log.debug("closed")


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    """``callback`` that runs on the first call only."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            callback()

    return call
