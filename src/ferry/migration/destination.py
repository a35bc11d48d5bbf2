"""The destination side of a migration: the receiver.

The receiver answers the source's Hello by opening one device stack per
described device (through a caller-supplied factory, so the CLI can create
files and the VM layer can create FUSE/NBD-exposed devices), then applies
events to each device's *waiting cache* remote handle:

* WriteBlocks: decode, check every block's hash, write (blocks the local side
  already overwrote are skipped by the cache);
* YouHave: the blocks are present from the shared base;
* DirtyList: the blocks become absent again (readers wait), then DirtyAck;
* Custom(HANDOFF): in a task of its own, so events keep flowing: in
  PRECOPY_ONLY mode wait until every block is present; run the hand-off hook
  (the VM layer loads device state and resumes the VM, fetching blocks it
  lacks), then CustomAck: the source suspended and waits for it, so until the
  acknowledgement a failure here leaves the source in charge;
* BlockHashes + Completed: read every block back, compare with the source's
  final hashes (blocks written locally after the hand-off excepted), then
  CompletedAck, or Error and IntegrityError naming the first bad block.

A local read of an absent block makes the cache call ``on_need``; the
receiver turns that into a NeedAt so the source sends the block next. If the
source vanishes, every waiting reader gets the error instead of hanging.
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
    IntegrityError,
    MigrationError,
    PeerError,
    RemoteProtocolError,
)
from ferry.migration.blocks import decode_run
from ferry.migration.channel import Channel
from ferry.migration.hashtable import BlockHashTable
from ferry.migration.limits import ReceiveLimits
from ferry.migration.policy import Mode
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
    Error,
    ErrorCode,
    Event,
    EventKind,
    Hello,
    HelloAck,
    NeedAt,
    ReadAt,
    ReadAtResponse,
    WriteBlocks,
    YouHave,
)
from ferry.storage.device import Geometry
from ferry.storage.hashing import block_hash

log = logging.getLogger(__name__)

ERROR_SEND_TIMEOUT_S = 2.0


class ReceivingDevice(Protocol):
    """What the receiver needs of a destination device: a waiting cache's remote handle."""

    @property
    def geometry(self) -> Geometry: ...

    async def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    async def read_at(self, offset: int, length: int) -> bytes: ...

    def mark_present(self, blocks: Iterable[int]) -> None: ...

    def mark_absent(self, blocks: Iterable[int]) -> None: ...

    def locally_written(self) -> frozenset[int]: ...

    def set_on_need(self, cb: Callable[[int], None] | None) -> None: ...

    async def wait_all_present(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


@dataclass(frozen=True, slots=True)
class DestinationDevice:
    device: ReceivingDevice
    has_base: bool = False


DeviceFactory = Callable[[Sequence[DeviceInfo]], Awaitable[Sequence[DestinationDevice]]]
HandoffHook = Callable[[bytes], Awaitable[None]]
CustomHook = Callable[[Custom], Awaitable[None]]


@dataclass(slots=True)
class ReceiveReport:
    devices: list[str] = field(default_factory=list)
    bytes_received: int = 0
    blocks_received: int = 0
    blocks_skipped_local: int = 0
    needs_sent: int = 0
    handoff_at_s: float | None = None
    total_s: float = 0.0
    verified: bool = False
    outcome: str = "running"


class Receiver:
    """Receives a device group from the migrator at the other end of ``channel``."""

    def __init__(
        self,
        channel: Channel,
        open_devices: DeviceFactory,
        *,
        mode: Mode = Mode.HYBRID,
        on_handoff: HandoffHook | None = None,
        on_custom: CustomHook | None = None,
        readback: bool = False,
        limits: ReceiveLimits | None = None,
    ) -> None:
        self._channel = channel
        self._limits = limits or ReceiveLimits()
        self._readback = readback
        self._open_devices = open_devices
        self._mode = mode
        self._on_handoff = on_handoff
        self._on_custom = on_custom
        self._devices: list[DestinationDevice] = []
        self._infos: list[DeviceInfo] = []
        self._final_hashes: list[BlockHashTable] = []
        self._received: list[BlockHashTable] = []
        self._completed: set[int] = set()
        self._needs: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self._phase = Phase.IDLE
        self._handed_off = asyncio.Event()
        self._handoff_task: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup
        self.report = ReceiveReport()
        self._log = log.getChild(channel.peer.replace(".", "_"))

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def devices(self) -> list[DestinationDevice]:
        return self._devices

    @property
    def handed_off(self) -> bool:
        return self._handed_off.is_set()

    async def wait_handoff(self) -> None:
        await self._handed_off.wait()

    async def run(self) -> ReceiveReport:
        start = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                needs = tg.create_task(self._send_needs())
                await self._receive_all(start)
                if self._handoff_task is not None:
                    await self._handoff_task
                needs.cancel()
        except BaseException as exc:
            inner = exc
            if isinstance(exc, BaseExceptionGroup):
                rest = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
                inner = rest[0] if rest else exc
            await self._fail(inner)
            if inner is exc or isinstance(inner, asyncio.CancelledError):
                raise
            if isinstance(inner, FerryError):
                raise inner from exc
            raise MigrationError(f"receiving failed: {inner}", phase=self._phase.value) from exc
        finally:
            self.report.total_s = time.monotonic() - start
        self._phase = Phase.COMPLETED
        self.report.outcome = "completed"
        self.report.verified = True
        return self.report

    async def _receive_all(self, start: float) -> None:
        hello = await self._channel.receive()
        if isinstance(hello, Error):
            raise PeerError(hello.reason, code=int(hello.code))
        if not isinstance(hello, Hello):
            raise RemoteProtocolError(f"expected Hello, got {type(hello).__name__}")
        if hello.version != PROTOCOL_VERSION:
            await self._channel.send(
                Error(ErrorCode.VERSION, f"protocol version {hello.version} not supported")
            )
            raise RemoteProtocolError(f"peer speaks protocol version {hello.version}")
        # Checked before the factory allocates or creates anything for them.
        self._limits.check(hello.devices)
        self._infos = list(hello.devices)
        self._devices = list(await self._open_devices(hello.devices))
        if len(self._devices) != len(self._infos):
            raise MigrationError("device factory returned the wrong number of devices")
        for index, (info, dev) in enumerate(zip(self._infos, self._devices, strict=True)):
            g = dev.device.geometry
            if (g.size_bytes, g.block_size_bytes) != (info.size_bytes, info.block_size_bytes):
                raise MigrationError(
                    f"local device has {g.size_bytes} bytes in blocks of {g.block_size_bytes}, "
                    f"source has {info.size_bytes} in {info.block_size_bytes}",
                    device=info.name,
                )
            dev.device.set_on_need(self._need_callback(index))
        counts = [d.device.geometry.block_count for d in self._devices]
        self._final_hashes = [BlockHashTable(n) for n in counts]
        self._received = [BlockHashTable(n) for n in counts]
        self.report.devices = [i.name for i in self._infos]
        await self._channel.send(
            HelloAck(PROTOCOL_VERSION, tuple(d.has_base for d in self._devices))
        )
        self._phase = Phase.PRECOPY
        while len(self._completed) < len(self._devices):
            event = await self._channel.receive()
            await self._on_event(event, start)

    async def _on_event(self, event: Event, start: float) -> None:
        match event:
            case WriteBlocks():
                index = self._check_device(event.device)
                info = self._infos[index]
                dev = self._devices[index].device
                data = decode_run(event, dev.geometry, info.name)
                await dev.write_at(dev.geometry.block_offset(event.first_block), data)
                received = self._received[index]
                for i, h in enumerate(event.hashes):
                    received.set(event.first_block + i, h)
                self.report.bytes_received += len(data)
                self.report.blocks_received += len(event.hashes)
            case YouHave():
                index = self._check_device(event.device)
                if not self._devices[index].has_base:
                    raise RemoteProtocolError(
                        f"YouHave for {self._infos[index].name}, which has no base here"
                    )
                self._check_blocks(index, event.blocks)
                self._devices[index].device.mark_present(event.blocks)
            case DirtyList():
                index = self._check_device(event.device)
                self._check_blocks(index, event.blocks)
                self._devices[index].device.mark_absent(event.blocks)
                received = self._received[index]
                for block in event.blocks:
                    received.discard(block)
                self._phase = Phase.DIRTY_CYCLES
                await self._channel.send(DirtyAck(event.device, event.sequence))
            case Custom(kind=EventKind.HANDOFF):
                if self._handoff_task is not None:
                    raise RemoteProtocolError("second HANDOFF")
                self._phase = Phase.STOP_AND_COPY
                # The hook (e.g. load device state and start the VM) may need blocks
                # that only arrive after the HANDOFF, so events keep flowing while
                # it runs; the acknowledgement goes out once it has finished.
                self._handoff_task = self._tasks.create_task(self._take_over(event, start))
            case Custom():
                if self._on_custom is not None:
                    await self._on_custom(event)
                await self._channel.send(CustomAck(event.sequence))
            case BlockHashes():
                index = self._check_device(event.device)
                g = self._devices[index].device.geometry
                if event.first_block < 0 or event.first_block + len(event.hashes) > g.block_count:
                    raise RemoteProtocolError("BlockHashes outside the device")
                table = self._final_hashes[index]
                for i, h in enumerate(event.hashes):
                    table.set(event.first_block + i, h)
            case Completed():
                index = self._check_device(event.device)
                await self._verify(index)
                self._completed.add(index)
                await self._channel.send(CompletedAck(event.device))
            case ReadAt():
                await self._channel.send(
                    ReadAtResponse(event.request_id, b"", "destination serves no reads")
                )
            case Error():
                raise PeerError(event.reason, code=int(event.code))
            case _:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} at the destination")

    async def _verify(self, index: int) -> None:
        """Check every block of device ``index`` against the source's final hashes.

        A block received over the wire was hashed on arrival (decode_run checks
        it against the hash it came with), so comparing that recorded hash with
        the final one proves the block holds the source's last version without
        reading it again. Blocks with no recorded hash (from a shared base, or
        with ``readback``) are read back and hashed. Blocks the destination
        wrote itself after the hand-off are newer than the source's and skipped.
        """
        info = self._infos[index]
        dev = self._devices[index].device
        g = dev.geometry
        table = self._final_hashes[index]
        if len(table) != g.block_count:
            raise RemoteProtocolError(
                f"{info.name}: Completed after hashes of {len(table)} of {g.block_count} blocks"
            )
        local = dev.locally_written()
        received = self._received[index]
        if self._readback:
            to_read = [b for b in range(g.block_count) if b not in local]
        else:
            missing, differing = received.compare(table)
            for block in differing:
                if block not in local:
                    await self._integrity_error(info.name, block)
            to_read = [b for b in missing if b not in local]
            if to_read and not self._devices[index].has_base:
                # Only a shared base supplies blocks that never came over the
                # wire: without one, reading back (up to the whole device)
                # would only find what the source never sent.
                raise RemoteProtocolError(
                    f"{info.name}: Completed before block {to_read[0]} arrived"
                )
        for block in to_read:
            data = await dev.read_at(g.block_offset(block), g.block_length(block))
            if block_hash(data) != table.get(block):
                await self._integrity_error(info.name, block)

    async def _integrity_error(self, device: str, block: int) -> None:
        exc = IntegrityError(
            "device differs from the source after migration", device=device, block=block
        )
        await self._channel.send(Error(ErrorCode.INTEGRITY, str(exc)))
        raise exc

    async def _take_over(self, event: Custom, start: float) -> None:
        if self._mode is Mode.PRECOPY_ONLY:
            for dest in self._devices:
                await dest.device.wait_all_present()
        if self._on_handoff is not None:
            await self._on_handoff(event.payload)
        self._handed_off.set()
        self.report.handoff_at_s = time.monotonic() - start
        self._phase = Phase.POSTCOPY
        await self._channel.send(CustomAck(event.sequence))

    def _need_callback(self, index: int) -> Callable[[int], None]:
        def need(block: int) -> None:
            self._needs.put_nowait((index, block))

        return need

    async def _send_needs(self) -> None:
        while True:
            index, block = await self._needs.get()
            g = self._devices[index].device.geometry
            self.report.needs_sent += 1
            await self._channel.send(NeedAt(index, g.block_offset(block), g.block_length(block)))

    def _check_device(self, index: int) -> int:
        if not 0 <= index < len(self._devices):
            raise RemoteProtocolError(f"peer named unknown device {index}")
        return index

    def _check_blocks(self, index: int, blocks: Iterable[int]) -> None:
        count = self._devices[index].device.geometry.block_count
        if any(not 0 <= b < count for b in blocks):
            raise RemoteProtocolError(f"{self._infos[index].name}: block index outside the device")

    async def _fail(self, exc: BaseException) -> None:
        self._phase = Phase.FAILED
        self.report.outcome = "failed"
        error = (
            exc if isinstance(exc, FerryError) else MigrationError(f"migration aborted: {exc!r}")
        )
        for dev in self._devices:
            dev.device.fail(error)
        if not isinstance(exc, PeerError):
            code = (
                ErrorCode.CANCELLED
                if isinstance(exc, asyncio.CancelledError)
                else ErrorCode.INTERNAL
            )
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ERROR_SEND_TIMEOUT_S):
                    await self._channel.send(Error(code, f"destination failed: {exc}"))
