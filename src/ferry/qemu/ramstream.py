"""Guest RAM in QEMU's own migration stream, carried over a ferry :class:`Stream`.

QEMU's precopy tracks dirty guest memory per 4 KiB page, sends an all-zero
page as a header only, and loads the stream straight into the destination's
private RAM: on the same guest it moves a quarter of the bytes of ferry's
block pre-copy and switches over in ~10 ms (docs/live-migration.md). This
module lets that stream ride ferry's authenticated link instead of a socket
of its own: QEMU writes it to a UNIX socket ferry listens on, ferry pumps it
into the link (a :class:`~ferry.transport.mux.Substream` beside the migration
channel), and on the destination pumps it into the UNIX socket the incoming
QEMU listens on. No second listener, no second credential.

Source, around a running VM (RAM in a ferry memory file or private)::

    out = await RamOut.start(vm, link, downtime_limit_ms=8)   # precopy starts
    paused_at = await out.wait_switchover()   # QEMU converged and paused the guest
    ...                                        # (disks' last blocks move here)
    await out.switch_over()                    # the last pages and the device state
    await out.wait_completed()                 # the source QEMU is postmigrate
    await out.cancel()                         # before the hand-off: keep the VM here

``pause-before-switchover`` gives ferry the moment between QEMU stopping the
guest (its block layer drained and flushed) and QEMU sending the device
state: the disks' final dirty blocks go out then, so the destination never
runs with an older disk than its RAM. Destination, a VM started with
``start_incoming`` on private RAM::

    inn = await RamIn.start(vm, link)         # migrate-incoming, pump starts
    await inn.wait_completed()                # RAM and devices loaded; VM paused (-S)

On the link the stream goes in frames (:mod:`ferry.protocol.ramframes`), each chunk
plain or zstd-compressed as :mod:`ferry.migration.autocompress` decides from the
link's measured speed and the data's compressibility.

What is verified: TLS (when the link has it) authenticates every record, so
a flipped, dropped or injected byte fails the link; QEMU checks the stream's
structure (section ids, sizes, the device state's own checks). RAM is not
hashed per page on arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ferry.aio import cancel_and_wait
from ferry.errors import BrokenResourceError, ClosedResourceError, FerryError
from ferry.migration.autocompress import SAMPLE_BYTES, AutoCompression, LinkCompression
from ferry.protocol import ramframes
from ferry.qemu import devstate
from ferry.qemu.errors import DeviceStateError
from ferry.qemu.vm import QemuVM, event_monotonic
from ferry.transport.base import Stream
from ferry.transport.streams import ConnectTimeoutError
from ferry.transport.unix import socket_when_listening

log = logging.getLogger(__name__)

MAX_BANDWIDTH_BYTES_S = 100 * 1024**3
"""No cap (QEMU's default caps precopy at 128 MiB/s); the link's own pace rules."""
CHUNK_BYTES = 256 * 1024
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
CONVERGE_AFTER_S = 5.0
"""Precopy that has not converged after this long gets a doubled ``downtime-limit``
(every time again), with ``auto-converge`` throttling the guest meanwhile: a guest
that dirties RAM faster than the link carries it still switches over, at a
bounded, reported cost, instead of iterating forever."""
MAX_DOWNTIME_LIMIT_MS = 2000
RAM_READY = b"F"
"""The destination's one byte back on the RAM link: its QEMU listens, the stream may
flow, in frames (:mod:`ferry.protocol.ramframes`). Until then the source sends nothing
on it, so RAM never waits in the link's buffers ahead of the migration channel's first
messages."""
RAM_READY_UNFRAMED = b"R"
"""What a destination of a ferry before framed RAM streams sends."""
PIPELINE_DEPTH = 2
"""Frames made ahead of the one on the link (at most 2 x 1 MiB held)."""
IDLE_S = 0.05
"""A read of QEMU's stream that waited this long: QEMU, not the link, set the pace."""
READY_TIMEOUT_S = 60.0


class RamStreamError(DeviceStateError):
    """QEMU's RAM migration failed (QEMU's reason, or the link's)."""


def _migration_event(status: frozenset[str]) -> Any:
    def match(event: Any) -> bool:
        return event.data.get("status") in status
    return match


class RamOut:
    """The source half; see the module docstring."""

    def __init__(self, vm: QemuVM, link: Stream, sock: socket.socket,
                 downtime_limit_ms: int, compression: LinkCompression) -> None:
        self.vm = vm
        self._link = link
        self._sock = sock
        self._downtime_limit_ms = downtime_limit_ms
        self._mark = vm.qmp.event_mark()
        self.bytes_sent = 0
        """QEMU's stream, as QEMU wrote it."""
        self.wire_bytes = 0
        """What went on the link for it (frames, some chunks compressed)."""
        self.compression = AutoCompression(compression)
        self._pump: asyncio.Task[None] | None = None
        self._converge: asyncio.Task[None] | None = None
        self.downtime_limit_raised_to_ms: int | None = None

    @classmethod
    async def start(cls, vm: QemuVM, link: Stream, *, downtime_limit_ms: int = 20,
                    compression: LinkCompression = LinkCompression.AUTO) -> RamOut:
        """Set QEMU up for precopy over ``link`` and start it; ``compression`` says what
        is compressed on the link (:mod:`ferry.migration.autocompress`)."""
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                ready = await link.receive_some(len(RAM_READY))
        except TimeoutError:
            raise RamStreamError("the destination's QEMU did not get ready for RAM within "
                                 f"{READY_TIMEOUT_S:.0f} s", vm=vm.name) from None
        except (BrokenResourceError, ClosedResourceError) as exc:
            raise RamStreamError(f"the RAM link failed: {exc}", vm=vm.name) from exc
        if ready == RAM_READY_UNFRAMED:
            raise RamStreamError("the destination's ferry is older than this one (it takes "
                                 "QEMU's stream unframed): upgrade it", vm=vm.name)
        if ready != RAM_READY:
            raise RamStreamError(f"the destination sent {ready!r:.20} instead of ready",
                                 vm=vm.name)
        path = vm.work_dir / "ram-out.sock"
        devstate.unlink_quietly(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        out = cls(vm, link, sock, downtime_limit_ms, compression)
        try:
            sock.bind(os.fspath(path))
            sock.listen(1)
            sock.setblocking(False)
            await _capabilities(vm, {"x-ignore-shared": False, "pause-before-switchover": True,
                                     "events": True, "auto-converge": True})
            await vm.qmp.execute("migrate-set-parameters", {
                "downtime-limit": downtime_limit_ms, "max-bandwidth": MAX_BANDWIDTH_BYTES_S})
            out._pump = asyncio.create_task(out._forward(path), name=f"ram-out {vm.name}")
            await vm.qmp.execute("migrate", {"uri": f"unix:{path}"})
            out._converge = asyncio.create_task(out._raise_limit(), name=f"converge {vm.name}")
        except BaseException:
            await out.aclose()  # the pump, if it started, and the socket
            devstate.unlink_quietly(path)
            raise
        return out

    async def _forward(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await loop.sock_accept(self._sock)
        finally:
            self._sock.close()
            devstate.unlink_quietly(path)
        auto = self.compression
        # The next chunks are read and framed (compressed, in a thread) while this one
        # is on the link: the stream goes at the slower of the two, not their sum.
        framed: asyncio.Queue[tuple[bytes, bool, int] | None] = asyncio.Queue(PIPELINE_DEPTH)

        async def frame_chunks() -> None:
            while True:
                t = time.monotonic()
                chunk = await loop.sock_recv(conn, CHUNK_BYTES)
                if not chunk:
                    await framed.put(None)
                    return
                if time.monotonic() - t >= IDLE_S:
                    auto.idle()
                frame, compressed = await _frame(auto, chunk)
                await framed.put((frame, compressed, len(chunk)))

        with conn:
            conn.setblocking(False)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(frame_chunks(), name=f"ram frames {self.vm.name}")
                while (item := await framed.get()) is not None:
                    frame, compressed, n = item
                    await self._link.send_all(frame)
                    auto.sent(n, len(frame), compressed=compressed)
                    self.bytes_sent += n
                    self.wire_bytes += len(frame)
        await self._link.send_eof()

    async def _raise_limit(self) -> None:
        limit = self._downtime_limit_ms
        while limit < MAX_DOWNTIME_LIMIT_MS:
            await asyncio.sleep(CONVERGE_AFTER_S)
            limit = min(limit * 2, MAX_DOWNTIME_LIMIT_MS)
            with contextlib.suppress(FerryError):
                await self.vm.qmp.execute("migrate-set-parameters", {"downtime-limit": limit})
                self.downtime_limit_raised_to_ms = limit
                log.info("vm %s: precopy not converged: downtime-limit now %d ms",
                         self.vm.name, limit)

    async def wait_switchover(self) -> float:
        """Wait until QEMU converged and paused the guest; the pause's monotonic time."""
        await _wait_migration(self.vm, self._mark, frozenset({"pre-switchover"}), self._pump)
        if self._converge is not None:
            await cancel_and_wait(self._converge)
        stop = await self.vm.qmp.wait_event("STOP", since=self._mark, timeout_s=5.0)
        self.vm.note_paused()
        return event_monotonic(stop.event.timestamp_s)

    async def switch_over(self) -> None:
        """Let QEMU send the last pages and the device state."""
        await self.vm.qmp.execute("migrate-continue", {"state": "pre-switchover"})

    async def wait_completed(self) -> dict[str, Any]:
        """QEMU's ``query-migrate`` once the stream is complete (and pumped into the link)."""
        await _wait_migration(self.vm, self._mark, frozenset({"completed"}), self._pump)
        assert self._pump is not None
        await self._pump
        info: dict[str, Any] = await self.vm.qmp.execute("query-migrate")
        return info

    async def cancel(self) -> None:
        """Stop the migration (before the hand-off): QEMU resumes the guest if it paused it."""
        with contextlib.suppress(FerryError):
            status = (await self.vm.qmp.execute("query-migrate")).get("status")
            if status not in FINAL_STATES:
                await self.vm.qmp.execute("migrate_cancel")
        await self.aclose()

    async def aclose(self) -> None:
        for task in (self._converge, self._pump):
            if task is not None:
                await cancel_and_wait(task, swallow_errors=True)
        self._sock.close()


async def _frame(auto: AutoCompression, chunk: bytes) -> tuple[bytes, bool]:
    """``chunk``'s frame, compressed if ``auto`` says so (in a worker thread: zstd
    releases the GIL, and the event loop keeps serving the disks' migration)."""
    if auto.compress_next():
        t = time.monotonic()
        packed = await asyncio.to_thread(ramframes.compress, chunk)
        auto.compressed(len(chunk), len(packed), time.monotonic() - t)
        if len(packed) < len(chunk):
            return ramframes.encode_frame(ramframes.ZSTD, packed), True
    elif auto.sample_next():
        sample = memoryview(chunk)[:SAMPLE_BYTES]
        t = time.monotonic()
        packed = ramframes.compress(sample)
        auto.compressed(len(sample), len(packed), time.monotonic() - t)
    return ramframes.encode_frame(ramframes.PLAIN, chunk), False


class RamIn:
    """The destination half; see the module docstring."""

    def __init__(self, vm: QemuVM, link: Stream) -> None:
        self.vm = vm
        self._link = link
        self._mark = vm.qmp.event_mark()
        self.bytes_received = 0
        """QEMU's stream, decoded."""
        self.wire_bytes = 0
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, vm: QemuVM, link: Stream) -> RamIn:
        """``migrate-incoming`` on a UNIX socket, and pump ``link`` into it."""
        path = vm.work_dir / "ram-in.sock"
        devstate.unlink_quietly(path)
        await _capabilities(vm, {"events": True})
        inn = cls(vm, link)
        await vm.qmp.execute("migrate-incoming", {"uri": f"unix:{path}"})
        inn._pump = asyncio.create_task(inn._forward(path), name=f"ram-in {vm.name}")
        return inn

    async def _forward(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn = await socket_when_listening(path, timeout_s=self.vm.config.qmp_timeout_s)
        except ConnectTimeoutError as exc:
            raise RamStreamError(f"the incoming QEMU never listened on {path}",
                                 vm=self.vm.name) from exc
        decoder = ramframes.FrameDecoder()
        with conn:
            while data := await self._link.receive_some(CHUNK_BYTES):
                self.wire_bytes += len(data)
                try:
                    chunks = decoder.feed(data)
                except ramframes.RamFrameError as exc:
                    raise RamStreamError(str(exc), vm=self.vm.name) from exc
                for chunk in chunks:
                    await loop.sock_sendall(conn, chunk)
                    self.bytes_received += len(chunk)
            try:
                decoder.finish()
            except ramframes.RamFrameError as exc:
                raise RamStreamError(str(exc), vm=self.vm.name) from exc
            conn.shutdown(socket.SHUT_WR)
            # QEMU closes its end once it has loaded the stream.
            while await loop.sock_recv(conn, 4096):
                pass

    async def wait_completed(self) -> None:
        """Until QEMU loaded everything (RAM and devices); the VM is then paused."""
        await _wait_migration(self.vm, self._mark, frozenset({"completed"}), self._pump)
        self.vm.note_loaded()

    async def aclose(self) -> None:
        if self._pump is not None:
            await cancel_and_wait(self._pump, swallow_errors=True)


async def _capabilities(vm: QemuVM, caps: dict[str, bool]) -> None:
    await vm.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name, "state": on} for name, on in caps.items()]})


async def _wait_migration(vm: QemuVM, since: int, wanted: frozenset[str],
                          pump: asyncio.Task[None] | None) -> Any:
    """The MIGRATION event with a status in ``wanted``; RamStreamError on failed or
    cancelled, or when the pump between QEMU and the link failed first."""
    event = asyncio.create_task(vm.qmp.wait_event(
        "MIGRATION", since=since, timeout_s=24 * 3600.0,
        match=_migration_event(wanted | {"failed", "cancelled"})))
    crashed = asyncio.create_task(vm.wait_crashed())
    waits: set[asyncio.Future[Any]] = {event, crashed}
    if pump is not None and not pump.done():
        waits.add(pump)
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if event in done:
            status = event.result().data.get("status")
            if status in wanted:
                return event.result()
            info = await vm.qmp.execute("query-migrate")
            raise RamStreamError(f"QEMU's migration {status}: "
                                 f"{info.get('error-desc', 'no reason given')}", vm=vm.name)
        if crashed in done:
            raise crashed.result()
        assert pump is not None
        exc = pump.exception()
        if isinstance(exc, (BrokenResourceError, ClosedResourceError)):
            raise RamStreamError(f"the RAM stream's link failed: {exc}", vm=vm.name) from exc
        if exc is not None:
            raise exc
        # The pump ended cleanly (the whole stream went through): wait for QEMU's word.
        return await _wait_migration(vm, since, wanted, None)
    finally:
        for task in (event, crashed):
            if not task.done():
                await cancel_and_wait(task, swallow_errors=True)


__all__ = ["RAM_READY", "RamIn", "RamOut", "RamStreamError"]
