"""The source side of a migration: the migrator.

Theory of operation. The source owns the authority over a group of devices
and moves it to a destination in five steps, the hybrid strategy of Silo and
Drafter:

1. **Hello.** Describe the group; the destination answers which shared
   read-only bases it already holds (their unchanged blocks are announced
   with YouHave instead of being sent).
2. **Pre-copy.** Send every block while the devices keep changing, least
   volatile first, with ``concurrency`` transfers in flight and never two of
   one block. Dirty tracking of a block starts when it is first read.
3. **Dirty cycles.** Repeatedly (``DirtyPolicy``): run the before-scan hook
   (the VM layer flushes guest memory there), take the dirty blocks, send
   them as a DirtyList, wait for its DirtyAck, then re-send them. After every
   scan :class:`~ferry.migration.policy.Convergence` decides whether another
   cycle can pay off (the set is small, or the writer outpaces the link, or a
   budget or limit is reached); the reason goes into the report. A stopping
   scan's blocks are re-sent as a last cycle or join the final dirty list.
4. **Suspend and hand-off.** Run the suspend hook (pause the VM, final
   flush), send the final DirtyList and, right behind it without waiting for
   its ack (the destination handles events in order, so the blocks are absent
   there before it sees the hand-off), the HANDOFF custom event; then stream
   the final dirty blocks behind it (NeedAt requests for them jump the queue).
   Both acks are awaited before the authority counts as moved. The destination acknowledges
   the hand-off once it runs; from then on it holds the authority. In
   PRECOPY_ONLY mode the final dirty blocks are sent *before* the hand-off.
5. **Post-copy.** Stream what the destination still lacks; NeedAt requests
   jump the queue. Per device: final block hashes, Completed, and the
   destination's CompletedAck after it verified every block.

If anything fails before the hand-off is acknowledged, the resume hook runs
(the VM keeps running here) and a MigrationError says what happened; the
source devices are only ever read, so nothing is lost. The migrator never sees
a socket: it speaks events over a :class:`~ferry.migration.channel.Channel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ferry.errors import (
    FerryError,
    MigrationError,
    MigrationStateError,
    PeerError,
    RemoteProtocolError,
)
from ferry.migration.autocompress import SAMPLE_BYTES, AutoCompression
from ferry.migration.blocks import Compression, compress_sample, encode_run
from ferry.migration.channel import Channel
from ferry.migration.policy import Convergence, DirtyPolicy, Mode, Scan
from ferry.migration.report import DeviceReport, MigrationReport
from ferry.migration.schedule import Run, WorkQueue
from ferry.migration.state import Phase
from ferry.protocol.messages import (
    PROTOCOL_VERSION,
    BlockHashes,
    Completed,
    CompletedAck,
    Custom,
    CustomAck,
    DeviceInfo,
    DirtyAck,
    DirtyList,
    DontNeedAt,
    Encoding,
    Error,
    ErrorCode,
    Event,
    EventKind,
    Hello,
    HelloAck,
    NeedAt,
    ReadAt,
    ReadAtResponse,
    YouHave,
)
from ferry.storage.device import Geometry
from ferry.storage.hashing import block_hash

log = logging.getLogger(__name__)

HASHES_PER_FRAME = 4096
DIRTY_BLOCKS_PER_FRAME = 65536
ERROR_SEND_TIMEOUT_S = 2.0


class TrackedDevice(Protocol):
    """What the migrator needs of a source device: the remote handle of a dirty tracker."""

    @property
    def size_bytes(self) -> int: ...

    @property
    def geometry(self) -> Geometry: ...

    async def read_at(self, offset: int, length: int) -> bytes: ...

    def take_dirty(self) -> list[int]: ...

    def track(self, blocks: Iterable[int]) -> None: ...


class VolatilitySource(Protocol):
    def least_volatile_first(self, blocks: Sequence[int]) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class SourceDevice:
    """One device of the group being migrated."""

    name: str
    device: TrackedDevice
    volatility: VolatilitySource | None = None
    base_hash: bytes | None = None
    base_blocks: Callable[[], frozenset[int]] | None = None
    compression: Compression = Compression.NONE
    max_dirty_blocks: int | None = None
    """This device's own "small enough" dirty count for the policy (None: the
    policy's). A scan counts as below only when every device is below its own."""


Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class MigrationHooks:
    """Where the VM layer plugs in. Every hook is optional.

    before_dirty_scan: before each dirty scan (flush guest memory).
    suspend: at the suspend point (pause the VM, flush memory, save state).
    resume: if the migration fails after suspend but before the hand-off was
        acknowledged: the source must carry on running.
    handoff_payload: bytes carried by the HANDOFF event (e.g. VM metadata).
    after_handoff: once the destination acknowledged the hand-off (it runs now):
        stop the source VM, release its forwarded ports. Post-copy continues.
    """

    before_dirty_scan: Hook | None = None
    suspend: Hook | None = None
    resume: Hook | None = None
    handoff_payload: Callable[[], Awaitable[bytes]] | None = None
    after_handoff: Hook | None = None


@dataclass(slots=True)
class Progress:
    phase: Phase = Phase.IDLE
    bytes_sent: int = 0
    blocks_sent: int = 0
    blocks_total: int = 0
    blocks_pending: int = 0
    cycle: int = 0
    started: float = field(default_factory=time.monotonic)


class Migrator:
    """Migrates a group of devices to the peer at the other end of ``channel``."""

    def __init__(
        self,
        devices: Sequence[SourceDevice],
        channel: Channel,
        *,
        policy: DirtyPolicy | None = None,
        mode: Mode = Mode.HYBRID,
        hooks: MigrationHooks | None = None,
        concurrency: int = 4,
        max_run_blocks: int = 16,
        verify_source: bool = False,
        auto_compression: AutoCompression | None = None,
    ) -> None:
        """``auto_compression``: decides, run by run, whether blocks of devices whose own
        ``compression`` is NONE go compressed (:mod:`ferry.migration.autocompress`)."""
        if not devices:
            raise MigrationStateError("nothing to migrate: empty device group")
        if concurrency < 1:
            raise MigrationStateError("concurrency must be >= 1")
        self._devices = list(devices)
        self._channel = channel
        self._policy = policy or DirtyPolicy()
        self._mode = mode
        self._hooks = hooks or MigrationHooks()
        self._concurrency = concurrency
        self._verify_source = verify_source
        self._auto = auto_compression
        self._geoms = [d.device.geometry for d in devices]
        self._work = WorkQueue([g.block_count for g in self._geoms], max_run_blocks=max_run_blocks)
        self._sent_hashes: list[list[bytes | None]] = [[None] * g.block_count for g in self._geoms]
        self._phase = Phase.IDLE
        self._suspended = False
        self._handed_off = False
        self._hello_ack: asyncio.Future[HelloAck] | None = None
        self._acks: dict[tuple[str, int, int], asyncio.Future[None]] = {}
        self._custom_seq = 0
        self._final_dirty: list[list[int]] = [[] for _ in devices]
        self._carried: list[list[int]] | None = None
        self._precopy_read_s = 0.0  # sum of read time x bytes, for the mean read time
        self._precopy_read_bytes = 0
        self._failed_phase = Phase.IDLE
        self._acked_complete = 0
        self._dirty_seq = 0
        self.report = MigrationReport(
            devices=[
                DeviceReport(d.name, g.size_bytes, g.block_count)
                for d, g in zip(devices, self._geoms, strict=True)
            ],
            mode=mode.value,
        )
        self.progress = Progress(blocks_total=sum(g.block_count for g in self._geoms))
        self._log = log.getChild(channel.peer.replace(".", "_"))

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def handed_off(self) -> bool:
        return self._handed_off

    async def run(self) -> MigrationReport:
        """Run the whole migration. Raises MigrationError (with .phase) on failure."""
        if self._phase is not Phase.IDLE:
            raise MigrationStateError(f"migration already {self._phase.value}")
        start = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self._receive_loop())
                workers = [tg.create_task(self._worker()) for _ in range(self._concurrency)]
                await self._drive()
                self._work.close()
                await asyncio.gather(*workers)
                receiver.cancel()
        except BaseException as exc:
            await self._fail(exc)
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            self.report.total_s = time.monotonic() - start
            if self._auto is not None:
                self.report.compression = {"mode": self._auto.mode.value,
                                           **self._auto.stats.as_dict()}
        self._set_phase(Phase.COMPLETED)
        self.report.outcome = "completed"
        return self.report

    # -- the five steps -------------------------------------------------------------

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello_ack = loop.create_future()
        await self._channel.send(
            Hello(
                PROTOCOL_VERSION,
                tuple(
                    DeviceInfo(d.name, g.size_bytes, g.block_size_bytes, d.base_hash)
                    for d, g in zip(self._devices, self._geoms, strict=True)
                ),
            )
        )
        ack = await self._hello_ack
        if len(ack.have_base) != len(self._devices):
            raise RemoteProtocolError("HelloAck does not describe every device")

        self._set_phase(Phase.PRECOPY)
        t0 = time.monotonic()
        everything: list[list[int]] = []
        for index, (dev, have) in enumerate(zip(self._devices, ack.have_base, strict=True)):
            blocks = list(range(self._geoms[index].block_count))
            if have and dev.base_blocks is not None:
                # Track the base's blocks first, then ask again which are still the
                # base's, as a read tracks before it reads (ferry.storage.modules.dirty):
                # a write that lands in between is either seen by the second question
                # (the block is sent) or finds the block tracked (it is sent again).
                maybe = dev.base_blocks()
                dev.device.track(maybe)
                shared = maybe & dev.base_blocks()
                await self._send_you_have(index, sorted(shared))
                blocks = [b for b in blocks if b not in shared]
            if dev.volatility is not None:
                blocks = dev.volatility.least_volatile_first(blocks)
            everything.append(blocks)
        postcopy = self._mode is Mode.POSTCOPY
        if not postcopy:
            for index, blocks in enumerate(everything):
                self._work.push(index, blocks)
            await self._work.wait_drained()
            self._set_phase(Phase.DIRTY_CYCLES)
            await self._dirty_cycles(send_s=time.monotonic() - t0)
        self.report.precopy_s = time.monotonic() - t0

        self._set_phase(Phase.STOP_AND_COPY)
        t_suspend = time.monotonic()
        self._suspended = True
        if self._hooks.suspend is not None:
            await self._hooks.suspend()
        final_acks = await self._send_final_dirty_lists(push=self._mode is Mode.PRECOPY_ONLY)
        if self._mode is Mode.PRECOPY_ONLY:
            await self._work.wait_drained()
        payload = b""
        if self._hooks.handoff_payload is not None:
            payload = await self._hooks.handoff_payload()
        # The destination acknowledges the hand-off once it runs (its hook may
        # read blocks of the final dirty list, e.g. to load device state), so the
        # final blocks start streaming right behind the HANDOFF event, and NeedAt
        # requests for them are served while the acknowledgement is pending. Until
        # it arrives the authority is still here: a failure resumes the source.
        handoff = self._start_custom(EventKind.HANDOFF, payload)
        await self._channel.send(handoff[1])
        if self._mode is Mode.HYBRID:
            for index, blocks in enumerate(self._final_dirty):
                self._work.push(index, blocks)
        elif postcopy:
            for index, blocks in enumerate(everything):
                self._work.push(index, blocks)
        # The final DirtyLists' acks come back with the hand-off's: the destination
        # handles events in order, so it marked the final blocks absent before it saw
        # the HANDOFF behind them, and waiting for their acks first would cost a round
        # trip of downtime. A failed or missing ack still fails the migration before
        # the authority moves.
        await asyncio.gather(*final_acks, handoff[0])
        self._handed_off = True
        self.report.suspend_to_handoff_ack_s = time.monotonic() - t_suspend
        self._log.info("authority handed off %.1f ms after the suspend point",
                       self.report.suspend_to_handoff_ack_s * 1e3)
        if self._hooks.after_handoff is not None:
            await self._hooks.after_handoff()

        self._set_phase(Phase.POSTCOPY)
        t_post = time.monotonic()
        await self._work.wait_drained()
        for index in range(len(self._devices)):
            await self._complete(index)
        self.report.postcopy_s = time.monotonic() - t_post

    async def _dirty_cycles(self, *, send_s: float) -> None:
        """Scan, announce and re-send dirty blocks until :class:`Convergence` says stop.

        ``send_s``: how long pre-copy took. Sets the report's ``stop_reason``;
        blocks of a stopping scan that are not re-sent join the final dirty list.
        """
        convergence = Convergence(
            self._policy, mode=self._mode, group_bytes=sum(g.size_bytes for g in self._geoms)
        )
        decision = convergence.start()
        sent_bytes = self.progress.bytes_sent
        # Tracking starts when pre-copy reads a block: the first scan's blocks were
        # watched, on average, since the mean time pre-copy read a byte.
        watched_since = (
            self._precopy_read_s / self._precopy_read_bytes if self._precopy_read_bytes else None
        )
        while decision.stop is None:
            # Pre-copy itself took a while, so the first scan runs at once; later
            # scans wait for the throttle so each sees a meaningful amount of change.
            if self.report.cycles:
                await asyncio.sleep(self._policy.cycle_throttle_s)
            if self._hooks.before_dirty_scan is not None:
                await self._hooks.before_dirty_scan()
            found = self._scan()
            scanned = time.monotonic()
            self.report.cycles += 1
            self.progress.cycle = self.report.cycles
            decision = convergence.after_scan(
                Scan(
                    dirty_blocks=sum(len(b) for b in found),
                    dirty_bytes=sum(
                        len(b) * g.block_size_bytes for b, g in zip(found, self._geoms, strict=True)
                    ),
                    small=self._all_small([len(b) for b in found]),
                    watched_s=0.0 if watched_since is None else scanned - watched_since,
                    sent_bytes=sent_bytes,
                    send_s=send_s,
                )
            )
            watched_since = scanned
            if decision.stop is not None and not decision.resend:
                self._carried = found  # sent with the final dirty list instead
                break
            before = self.progress.bytes_sent
            await self._announce(found)
            await self._work.wait_drained()
            sent_bytes = self.progress.bytes_sent - before
            send_s = time.monotonic() - scanned
        assert decision.stop is not None
        self.report.stop_reason = decision.stop.value
        self._log.info(
            "dirty cycles stopped after %d scans: %s (%s; re-sent %.1f MiB; predicted next"
            " scan %s)",
            self.report.cycles,
            decision.stop.value,
            "last scan re-sent" if decision.resend else "last scan joins the final list",
            convergence.resent_bytes / 2**20,
            "n/a" if decision.predicted_next_bytes is None
            else f"{decision.predicted_next_bytes / 2**20:.1f} MiB",
        )

    def _scan(self, carried: list[list[int]] | None = None) -> list[list[int]]:
        """Take every device's dirty blocks, with ``carried`` ones merged in (recorded in
        the report)."""
        found = [dev.device.take_dirty() for dev in self._devices]
        if carried is not None:
            found = [sorted(set(c).union(b)) for c, b in zip(carried, found, strict=True)]
        for index, blocks in enumerate(found):
            self.report.devices[index].dirty_blocks_by_cycle.append(len(blocks))
        return found

    async def _announce(
        self, found: list[list[int]], *, push: bool = True, final: bool = False,
        wait_acks: bool = True,
    ) -> list[asyncio.Future[None]]:
        """Announce each device's dirty blocks, wait for the acks and (if ``push``) queue them.

        With ``final`` the lists are kept for post-copy instead of being queued
        (unless ``push``). Without ``wait_acks`` the acks' futures are returned
        unawaited (nothing may be pushed then: a re-sent block must follow its ack).
        """
        if push and not wait_acks:
            raise ValueError("blocks are re-sent only after their DirtyList's ack")
        waits: list[asyncio.Future[None]] = []
        for index, blocks in enumerate(found):
            for start in range(0, max(len(blocks), 1), DIRTY_BLOCKS_PER_FRAME):
                chunk = blocks[start : start + DIRTY_BLOCKS_PER_FRAME]
                if not chunk and start:
                    break
                self._dirty_seq += 1
                fut = self._expect(("dirty", index, self._dirty_seq))
                waits.append(fut)
                await self._channel.send(DirtyList(index, self._dirty_seq, tuple(chunk)))
        if not wait_acks:
            if final:
                self._final_dirty = found
            return waits
        await asyncio.gather(*waits)
        if final:
            self._final_dirty = found
        if push:
            for index, blocks in enumerate(found):
                self._work.push(index, blocks)
        return []

    async def _send_final_dirty_lists(self, *, push: bool) -> list[asyncio.Future[None]]:
        """The last scan, with the source suspended, plus blocks a stopping scan carried.

        Returns the acks still to come: with ``push`` (the blocks are re-sent before
        the hand-off) they were awaited here; otherwise the caller awaits them with the
        hand-off's acknowledgement.
        """
        found = self._scan(self._carried)
        self._carried = None
        return await self._announce(found, push=push, final=True, wait_acks=push)

    def _all_small(self, counts: list[int]) -> bool:
        limit = self._policy.max_dirty_blocks
        return all(
            n <= (limit if d.max_dirty_blocks is None else d.max_dirty_blocks)
            for d, n in zip(self._devices, counts, strict=True)
        )

    async def _send_you_have(self, index: int, blocks: list[int]) -> None:
        self.report.devices[index].base_blocks += len(blocks)
        for start in range(0, len(blocks), DIRTY_BLOCKS_PER_FRAME):
            await self._channel.send(
                YouHave(index, tuple(blocks[start : start + DIRTY_BLOCKS_PER_FRAME]))
            )

    def _start_custom(self, kind: int, payload: bytes) -> tuple[asyncio.Future[None], Custom]:
        """A custom event to send and the future its acknowledgement resolves."""
        self._custom_seq += 1
        fut = self._expect(("custom", 0, self._custom_seq))
        return fut, Custom(self._custom_seq, kind, payload)

    async def _complete(self, index: int) -> None:
        geometry = self._geoms[index]
        hashes = self._sent_hashes[index]
        dev = self._devices[index].device
        for block in range(geometry.block_count):
            if hashes[block] is None or self._verify_source:
                data = await dev.read_at(geometry.block_offset(block), geometry.block_length(block))
                hashes[block] = block_hash(data)
        final = [h for h in hashes if h is not None]
        for start in range(0, len(final), HASHES_PER_FRAME):
            await self._channel.send(
                BlockHashes(index, start, tuple(final[start : start + HASHES_PER_FRAME]))
            )
        fut = self._expect(("completed", index, 0))
        await self._channel.send(Completed(index))
        await fut

    # -- workers and the receive loop --------------------------------------------------

    async def _worker(self) -> None:
        while True:
            run = self._work.next_run()
            if run is None:
                if self._work.closed:
                    return
                await self._work.wait_for_work()
                continue
            try:
                await self._send_run(run)
            finally:
                self._work.done(run)

    async def _send_run(self, run: Run) -> None:
        dev = self._devices[run.device]
        geometry = self._geoms[run.device]
        offset = geometry.block_offset(run.first_block)
        last = run.first_block + run.count - 1
        length = geometry.block_offset(last) + geometry.block_length(last) - offset
        data = await dev.device.read_at(offset, length)
        if self._phase is Phase.PRECOPY:
            self._precopy_read_s += time.monotonic() * length
            self._precopy_read_bytes += length
        report = self.report.devices[run.device]
        hashes = self._sent_hashes[run.device]
        compression, auto = dev.compression, None
        if compression is Compression.NONE and self._auto is not None:
            auto = self._auto
            if auto.compress_next():
                compression = Compression.ZSTD
            elif auto.sample_next():
                sample = memoryview(data)[:SAMPLE_BYTES]
                t = time.monotonic()
                packed = compress_sample(sample)
                auto.compressed(len(sample), len(packed), time.monotonic() - t)
        if compression is Compression.NONE:
            events = encode_run(run.device, run.first_block, geometry, data)
        else:
            # zstd and lz4 release the GIL: the event loop keeps serving meanwhile.
            t = time.monotonic()
            events = await asyncio.to_thread(encode_run, run.device, run.first_block,
                                             geometry, data, compression)
            if auto is not None:
                packed_bytes = sum(len(e.data) for e in events
                                   if e.encoding is not Encoding.ZEROES)
                plain_bytes = length - sum(
                    geometry.block_length(e.first_block) * len(e.hashes)
                    for e in events if e.encoding is Encoding.ZEROES)
                auto.compressed(plain_bytes, packed_bytes, time.monotonic() - t)
        wire = 0
        for event in events:
            await self._channel.send(event)
            for i, h in enumerate(event.hashes):
                hashes[event.first_block + i] = h
            wire += len(event.data) + 16 * len(event.hashes)
            if event.encoding is Encoding.ZEROES:
                report.zero_blocks += len(event.hashes)
        report.wire_bytes += wire
        if auto is not None:
            auto.sent(length, wire, compressed=compression is not Compression.NONE)
        report.add(self._phase.value, run.count, length)
        self.progress.bytes_sent += length
        self.progress.blocks_sent += run.count
        self.progress.blocks_pending = self._work.pending_count

    async def _receive_loop(self) -> None:
        # Ends after the last CompletedAck: the destination may close right after it.
        while self._acked_complete < len(self._devices):
            event = await self._channel.receive()
            await self._on_event(event)

    async def _on_event(self, event: Event) -> None:
        match event:
            case HelloAck():
                if self._hello_ack is None or self._hello_ack.done():
                    raise RemoteProtocolError("unexpected HelloAck")
                if event.version != PROTOCOL_VERSION:
                    raise RemoteProtocolError(f"peer speaks protocol version {event.version}")
                self._hello_ack.set_result(event)
            case DirtyAck():
                self._resolve(("dirty", event.device, event.sequence))
            case CustomAck():
                self._resolve(("custom", 0, event.sequence))
            case CompletedAck():
                self._resolve(("completed", event.device, 0))
                self._acked_complete += 1
            case NeedAt():
                index = self._check_device(event.device)
                blocks = self._geoms[index].blocks_touching(event.offset, event.length)
                self._check_blocks(index, blocks)
                moved = self._work.push_urgent(index, blocks)
                self.report.devices[index].postcopy_fetches += 1
                self.report.postcopy_fetches += 1
                self._log.debug("need-at %s blocks %s (%d pending)", index, blocks, moved)
            case DontNeedAt():
                index = self._check_device(event.device)
                geometry = self._geoms[index]
                first = -(-event.offset // geometry.block_size_bytes)
                end = (event.offset + event.length) // geometry.block_size_bytes
                if event.offset + event.length == geometry.size_bytes:
                    end = geometry.block_count
                self._work.discard(index, range(first, max(first, end)))
            case ReadAt():
                await self._serve_read(event)
            case Error():
                raise PeerError(event.reason, code=int(event.code))
            case _:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} at the source")

    async def _serve_read(self, event: ReadAt) -> None:
        try:
            index = self._check_device(event.device)
            data = await self._devices[index].device.read_at(event.offset, event.length)
        except FerryError as exc:
            await self._channel.send(ReadAtResponse(event.request_id, b"", str(exc)))
            return
        await self._channel.send(ReadAtResponse(event.request_id, data))

    # -- helpers -------------------------------------------------------------------------

    def _expect(self, key: tuple[str, int, int]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[key] = fut
        return fut

    def _resolve(self, key: tuple[str, int, int]) -> None:
        fut = self._acks.pop(key, None)
        if fut is None:
            raise RemoteProtocolError(f"unexpected acknowledgement {key}")
        fut.set_result(None)

    def _check_device(self, index: int) -> int:
        if not 0 <= index < len(self._devices):
            raise RemoteProtocolError(f"peer named unknown device {index}")
        return index

    def _check_blocks(self, index: int, blocks: range) -> None:
        if blocks and (blocks.start < 0 or blocks.stop > self._geoms[index].block_count):
            raise RemoteProtocolError(f"peer asked for blocks {blocks} outside the device")

    def _set_phase(self, phase: Phase) -> None:
        self._log.debug("phase %s -> %s", self._phase.value, phase.value)
        self._phase = phase
        self.progress.phase = phase

    async def _fail(self, exc: BaseException) -> None:
        phase = self._failed_phase = self._phase
        self._set_phase(Phase.FAILED)
        self.report.outcome = "failed"
        for fut in self._acks.values():
            fut.cancel()
        reason = str(exc) or type(exc).__name__
        if not isinstance(exc, PeerError):
            code = (
                ErrorCode.CANCELLED
                if isinstance(exc, asyncio.CancelledError)
                else ErrorCode.INTERNAL
            )
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ERROR_SEND_TIMEOUT_S):
                    await self._channel.send(
                        Error(code, f"source failed in {phase.value}: {reason}")
                    )
        if self._suspended and not self._handed_off and self._hooks.resume is not None:
            self._log.warning("migration failed before hand-off; resuming the source")
            await self._hooks.resume()

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, BaseExceptionGroup):
            inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
            if inner:
                exc = inner[0]
        if isinstance(exc, asyncio.CancelledError | MigrationError):
            return exc
        where = "after" if self._handed_off else "before"
        return MigrationError(
            f"migration failed {where} the hand-off: {exc}", phase=self._failed_phase.value
        )
