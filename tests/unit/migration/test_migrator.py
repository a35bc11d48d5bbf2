"""The migrator and receiver, end to end in memory (channels without sockets)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence

import pytest

from ferry.errors import (
    BrokenResourceError,
    IntegrityError,
    MigrationError,
    PeerError,
    TransportError,
)
from ferry.migration.autocompress import AutoCompression, LinkCompression
from ferry.migration.channel import Channel, StreamChannel, memory_channel_pair
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.policy import DirtyPolicy, Mode
from ferry.migration.report import MigrationReport
from ferry.migration.source import MigrationHooks, Migrator
from ferry.migration.stacks import DestinationStack, SourceStack, destination_stack, source_stack
from ferry.protocol.messages import (
    Custom,
    DeviceInfo,
    DirtyAck,
    Error,
    ErrorCode,
    Event,
    WriteBlocks,
)
from ferry.storage.providers.memory import MemoryDevice
from ferry.transport.memory import memory_stream_pair
from ferry.transport.ratelimit import RateLimited

BS = 4096
FAST = DirtyPolicy(max_dirty_blocks=4, min_cycles_below=2, max_cycles=6, cycle_throttle_s=0.01)


async def make_source(name: str, size: int, *, seed: int) -> SourceStack:
    stack = source_stack(name, MemoryDevice(size), BS)
    rnd = random.Random(seed)
    await stack.local.write_at(0, rnd.randbytes(size))
    return stack


def factory(
    dests: list[DestinationStack],
) -> object:
    async def open_devices(infos: Sequence[DeviceInfo]) -> list[DestinationDevice]:
        for info in infos:
            dests.append(
                destination_stack(info.name, MemoryDevice(info.size_bytes), info.block_size_bytes)
            )
        return [d.destination_device() for d in dests]

    return open_devices


async def snapshot(dev: SourceStack | DestinationStack) -> bytes:
    return await dev.remote.read_at(0, dev.remote.size_bytes)


async def migrate(
    sources: list[SourceStack],
    *,
    channels: tuple[Channel, Channel] | None = None,
    writer: bool = False,
    mode: Mode = Mode.HYBRID,
    after_handoff: object = None,
) -> tuple[list[DestinationStack], dict[str, bytes]]:
    a, b = channels or memory_channel_pair()
    dests: list[DestinationStack] = []
    frozen: dict[str, bytes] = {}
    stop = asyncio.Event()

    async def write_randomly() -> None:
        rnd = random.Random(7)
        while not stop.is_set():
            src = rnd.choice(sources)
            off = rnd.randrange(src.local.size_bytes - 100)
            await src.local.write_at(off, rnd.randbytes(rnd.randrange(1, 100)))
            await asyncio.sleep(0)

    async def suspend() -> None:
        stop.set()
        for s in sources:
            frozen[s.name] = await snapshot(s)

    migrator = Migrator(
        [s.source_device() for s in sources],
        a,
        policy=FAST,
        mode=mode,
        hooks=MigrationHooks(suspend=suspend),
    )
    receiver = Receiver(b, factory(dests), mode=mode)  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as tg:
        if writer:
            tg.create_task(write_randomly())
        tg.create_task(receiver.run())
        await migrator.run()
    assert receiver.report.verified
    return dests, frozen


async def test_two_devices_with_partial_last_block_migrate_exactly() -> None:
    sources = [
        await make_source("a", 10 * BS + 123, seed=1),
        await make_source("b", 3 * BS, seed=2),
    ]
    dests, frozen = await migrate(sources)
    for s, d in zip(sources, dests, strict=True):
        assert await snapshot(d) == frozen[s.name] == await snapshot(s)


@pytest.mark.parametrize("mode", [Mode.HYBRID, Mode.PRECOPY_ONLY])
async def test_concurrent_writer_destination_equals_source_at_handoff(mode: Mode) -> None:
    sources = [
        await make_source("mem", 64 * BS, seed=3),
        await make_source("disk", 32 * BS + 5, seed=4),
    ]
    dests, frozen = await migrate(sources, writer=True, mode=mode)
    for s, d in zip(sources, dests, strict=True):
        assert await snapshot(d) == frozen[s.name]


async def test_over_codec_and_byte_stream() -> None:
    sa, sb = memory_stream_pair()
    sources = [await make_source("x", 40 * BS + 1, seed=5)]
    dests, frozen = await migrate(
        sources, channels=(StreamChannel(sa), StreamChannel(sb)), writer=True
    )
    assert await snapshot(dests[0]) == frozen["x"]


async def test_zero_blocks_are_elided_on_the_wire() -> None:
    src = source_stack("z", MemoryDevice(16 * BS), BS)
    await src.local.write_at(3 * BS, b"\x01" * BS)
    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    migrator = Migrator([src.source_device()], a, policy=FAST)
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(receiver.run())
        report = await migrator.run()
    assert report.devices[0].zero_blocks == 15
    assert await snapshot(dests[0]) == await snapshot(src)


class Tamper:
    """A channel that flips one byte of the first WriteBlocks it forwards."""

    def __init__(self, inner: Channel) -> None:
        self.inner = inner
        self.done = False

    @property
    def peer(self) -> str:
        return self.inner.peer

    async def send(self, event: Event) -> None:
        if isinstance(event, WriteBlocks) and event.data and not self.done:
            self.done = True
            data = bytearray(event.data)
            data[5] ^= 0xFF
            event = WriteBlocks(
                event.device, event.first_block, event.encoding, event.hashes, bytes(data)
            )
        await self.inner.send(event)

    async def receive(self) -> Event:
        return await self.inner.receive()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_corrupted_block_is_an_integrity_error_on_both_sides() -> None:
    src = await make_source("d", 8 * BS, seed=9)
    before = await snapshot(src)
    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    migrator = Migrator([src.source_device()], Tamper(a), policy=FAST)
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    results = await asyncio.gather(receiver.run(), migrator.run(), return_exceptions=True)
    assert isinstance(results[0], IntegrityError)
    assert results[0].device == "d"
    assert results[0].block == 0
    assert isinstance(results[1], PeerError)
    assert await snapshot(src) == before


async def test_peer_vanishing_at_suspend_fails_cleanly_and_source_resumes() -> None:
    src = await make_source("d", 64 * BS, seed=10)
    before = await snapshot(src)
    a, b = memory_channel_pair()
    resumed = asyncio.Event()
    dests: list[DestinationStack] = []

    async def suspend() -> None:
        await b.aclose()  # the destination goes away right at the suspend point

    async def resume() -> None:
        resumed.set()

    migrator = Migrator(
        [src.source_device()],
        a,
        policy=FAST,
        hooks=MigrationHooks(suspend=suspend, resume=resume),
    )
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    results = await asyncio.gather(migrator.run(), receiver.run(), return_exceptions=True)
    assert isinstance(results[0], MigrationError), results
    assert isinstance(results[1], TransportError), results
    assert resumed.is_set()
    assert results[0].phase == "stop-and-copy"
    assert "before the hand-off" in str(results[0])
    assert await snapshot(src) == before


async def test_receiver_fails_waiters_when_source_disappears() -> None:
    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    task = asyncio.create_task(receiver.run())
    from ferry.protocol.messages import Hello

    await a.send(Hello(1, (DeviceInfo("m", 4 * BS, BS),)))
    await a.receive()  # HelloAck
    reader = asyncio.create_task(dests[0].local.read_at(0, 10))
    await asyncio.sleep(0.01)
    await a.aclose()
    with pytest.raises(BrokenResourceError):
        await task
    with pytest.raises(BrokenResourceError):
        await reader


async def test_error_event_from_peer_is_a_peer_error() -> None:
    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    await a.send(Error(ErrorCode.INTERNAL, "disk on fire"))
    with pytest.raises(PeerError, match="disk on fire"):
        await receiver.run()


async def test_postcopy_read_at_destination_fetches_block_on_demand() -> None:
    """After the hand-off the destination reads a block still in flight: it gets
    fresh data, and its request reached the source as a NeedAt."""
    size = 256 * BS
    src = source_stack("m", MemoryDevice(size), BS)
    await src.local.write_at(0, os.urandom(size))
    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    got: dict[str, bytes] = {}
    last = 255

    async def suspend() -> None:
        # Dirty the last block so it only arrives in post-copy.
        await src.local.write_at(last * BS, b"\xee" * BS)

    async def on_handoff(payload: bytes) -> None:
        async def read() -> None:
            got["data"] = await dests[0].local.read_at(last * BS, BS)

        asyncio.get_running_loop().create_task(read())

    migrator = Migrator(
        [src.source_device()],
        a,
        policy=DirtyPolicy(max_cycles=0, cycle_throttle_s=0),
        hooks=MigrationHooks(suspend=suspend),
    )
    receiver = Receiver(b, factory(dests), on_handoff=on_handoff)  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(receiver.run())
        await migrator.run()
    assert got["data"] == b"\xee" * BS
    assert await snapshot(dests[0]) == await snapshot(src)


async def test_cycles_stop_when_the_dirty_set_stops_shrinking() -> None:
    """A writer that keeps dirtying the same number of blocks: the migrator gives up
    cycling after max_cycles_without_progress scans, well before max_cycles."""
    src = await make_source("hot", 64 * BS, seed=11)
    stop = asyncio.Event()

    async def hot_writer() -> None:
        rnd = random.Random(3)
        while not stop.is_set():
            await src.local.write_at(rnd.randrange(32) * BS, rnd.randbytes(BS))
            await asyncio.sleep(0)

    async def suspend() -> None:
        stop.set()

    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    policy = DirtyPolicy(
        max_dirty_blocks=0,
        min_cycles_below=1,
        max_cycles=50,
        cycle_throttle_s=0.01,
        max_cycles_without_progress=3,
        max_resend_ratio=0,  # the rule under test alone: no budget, no rate prediction
        stop_on_dirty_rate=False,
    )
    migrator = Migrator(
        [src.source_device()], a, policy=policy, hooks=MigrationHooks(suspend=suspend)
    )
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(hot_writer())
        tg.create_task(receiver.run())
        report = await migrator.run()
    assert 4 <= report.cycles < 50
    assert report.stop_reason == "no-progress"
    assert await snapshot(dests[0]) == await snapshot(src)


async def test_handoff_hook_may_read_blocks_of_the_final_dirty_list() -> None:
    """B loads its device state inside the hand-off hook, from blocks that only
    arrive after the HANDOFF: the receiver keeps processing events meanwhile and
    acknowledges once the hook is done; the source counts downtime until then."""
    size = 64 * BS
    src = source_stack("state", MemoryDevice(size), BS)
    await src.local.write_at(0, os.urandom(size))
    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    seen: dict[str, bytes] = {}
    after: list[bool] = []

    async def suspend() -> None:
        await src.local.write_at(10 * BS, b"\x42" * (3 * BS))  # final dirty list

    async def on_handoff(payload: bytes) -> None:
        seen["state"] = await dests[0].local.read_at(10 * BS, 3 * BS)
        await asyncio.sleep(0.05)  # resuming the VM takes a while

    async def after_handoff() -> None:
        after.append(receiver.handed_off)

    migrator = Migrator(
        [src.source_device()],
        a,
        policy=DirtyPolicy(max_cycles=0, cycle_throttle_s=0),
        hooks=MigrationHooks(suspend=suspend, after_handoff=after_handoff),
    )
    receiver = Receiver(b, factory(dests), on_handoff=on_handoff)  # type: ignore[arg-type]
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        tg.create_task(receiver.run())
        report = await migrator.run()
    assert seen["state"] == b"\x42" * (3 * BS)
    assert after == [True]
    assert report.suspend_to_handoff_ack_s is not None
    assert report.suspend_to_handoff_ack_s >= 0.05  # the acknowledgement waited for the hook


async def test_failing_handoff_hook_keeps_the_authority_at_the_source() -> None:
    src = await make_source("m", 16 * BS, seed=12)
    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    resumed: list[bool] = []

    async def on_handoff(payload: bytes) -> None:
        raise RuntimeError("QEMU refused the device state")

    async def resume() -> None:
        resumed.append(True)

    migrator = Migrator([src.source_device()], a, policy=FAST, hooks=MigrationHooks(resume=resume))
    receiver = Receiver(b, factory(dests), on_handoff=on_handoff)  # type: ignore[arg-type]
    results = await asyncio.gather(migrator.run(), receiver.run(), return_exceptions=True)
    assert isinstance(results[0], PeerError)
    assert "QEMU refused the device state" in str(results[0])
    assert not migrator.handed_off
    assert resumed == [True]
    assert isinstance(results[1], MigrationError)


class Recorder(Tamper):
    """A channel that records the kinds of events it receives, in order."""

    def __init__(self, inner: Channel) -> None:
        super().__init__(inner)
        self.done = True  # never tamper
        self.kinds: list[str] = []

    async def receive(self) -> Event:
        event = await self.inner.receive()
        self.kinds.append(type(event).__name__)
        return event


async def test_postcopy_mode_hands_over_first_and_fetches_on_demand() -> None:
    """Pure post-copy (a registry start): nothing is sent before the hand-off; the
    destination's first reads are served by NeedAt ahead of the background stream."""
    size = 512 * BS
    src = source_stack("mem", MemoryDevice(size), BS)
    await src.local.write_at(0, os.urandom(size))
    a, b = memory_channel_pair()
    recorder = Recorder(b)
    dests: list[DestinationStack] = []
    got: dict[str, bytes] = {}

    async def on_handoff(payload: bytes) -> None:
        got["first"] = await dests[0].local.read_at(400 * BS, 2 * BS)

    migrator = Migrator([src.source_device()], a, mode=Mode.POSTCOPY, concurrency=1)
    receiver = Receiver(recorder, factory(dests), mode=Mode.POSTCOPY, on_handoff=on_handoff)  # type: ignore[arg-type]
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        tg.create_task(receiver.run())
        report = await migrator.run()
    assert report.cycles == 0
    assert "precopy" not in report.devices[0].bytes_by_phase
    assert recorder.kinds.index("Custom") < recorder.kinds.index("WriteBlocks")
    assert got["first"] == await src.remote.read_at(400 * BS, 2 * BS)
    assert await snapshot(dests[0]) == await snapshot(src)


@pytest.mark.parametrize(
    ("hot_limit", "cycles", "reason"), [(None, 2, "small-dirty-set"), (0, 6, "cycle-limit")]
)
async def test_per_device_dirty_threshold(hot_limit: int | None, cycles: int, reason: str) -> None:
    """A device's own max_dirty_blocks overrides the policy's for that device."""
    import dataclasses

    hot = await make_source("hot", 64 * BS, seed=13)
    cold = await make_source("cold", 64 * BS, seed=14)
    stop = asyncio.Event()

    async def writer() -> None:
        rnd = random.Random(5)
        while not stop.is_set():
            await hot.local.write_at(rnd.randrange(64) * BS, rnd.randbytes(16))
            await asyncio.sleep(0)

    async def suspend() -> None:
        stop.set()

    a, b = memory_channel_pair()
    dests: list[DestinationStack] = []
    policy = DirtyPolicy(
        max_dirty_blocks=1000,
        min_cycles_below=2,
        max_cycles=6,
        cycle_throttle_s=0.01,
        max_cycles_without_progress=0,
        max_resend_ratio=0,  # the thresholds alone decide
        stop_on_dirty_rate=False,
    )
    devices = [
        dataclasses.replace(hot.source_device(), max_dirty_blocks=hot_limit),
        cold.source_device(),
    ]
    migrator = Migrator(devices, a, policy=policy, hooks=MigrationHooks(suspend=suspend))
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer())
        tg.create_task(receiver.run())
        report = await migrator.run()
    assert (report.cycles, report.stop_reason) == (cycles, reason)


class HoldFinalDirtyAcks:
    """The destination's channel: once the source is suspended, DirtyAcks are held back
    until the HANDOFF has arrived (a long link on which the source must not wait)."""

    def __init__(self, inner: Channel, suspended: asyncio.Event) -> None:
        self.inner = inner
        self.suspended = suspended
        self.handoff_seen = asyncio.Event()
        self.held: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def peer(self) -> str:
        return self.inner.peer

    async def send(self, event: Event) -> None:
        if isinstance(event, DirtyAck) and self.suspended.is_set():
            # Held in a task of its own: the receiver sends acks from its receive loop,
            # which must go on to receive the HANDOFF.
            self.held.append(f"dirty-ack {event.device}/{event.sequence}")
            self.tasks.append(asyncio.create_task(self._after_handoff(event)))
            return
        await self.inner.send(event)

    async def _after_handoff(self, event: Event) -> None:
        await self.handoff_seen.wait()
        await self.inner.send(event)

    async def receive(self) -> Event:
        event = await self.inner.receive()
        if isinstance(event, Custom):
            self.handoff_seen.set()
        return event

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_handoff_follows_the_final_dirty_list_without_waiting_for_its_ack() -> None:
    """The final DirtyList's ack is not awaited before the HANDOFF is sent (one round trip
    less downtime); the destination applied the list first, so it equals the source."""
    sources = [await make_source("a", 32 * BS, seed=21), await make_source("b", 8 * BS, seed=22)]
    suspended = asyncio.Event()
    stop = asyncio.Event()
    frozen: dict[str, bytes] = {}

    async def writer() -> None:
        rnd = random.Random(3)
        while not stop.is_set():
            await sources[0].local.write_at(rnd.randrange(32) * BS, rnd.randbytes(64))
            await asyncio.sleep(0.001)

    async def suspend() -> None:
        stop.set()
        for s in sources:
            frozen[s.name] = await snapshot(s)
        suspended.set()

    a, b = memory_channel_pair()
    held = HoldFinalDirtyAcks(b, suspended)
    dests: list[DestinationStack] = []
    migrator = Migrator([s.source_device() for s in sources], a, policy=FAST,
                        hooks=MigrationHooks(suspend=suspend))
    receiver = Receiver(held, factory(dests))  # type: ignore[arg-type]
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        tg.create_task(writer())
        tg.create_task(receiver.run())
        report = await migrator.run()
    assert len(held.held) == 2  # one final list per device, both held until the HANDOFF
    assert migrator.handed_off
    assert report.suspend_to_handoff_ack_s is not None
    for s, d in zip(sources, dests, strict=True):
        assert await snapshot(d) == frozen[s.name]


async def _migrate_auto(src: SourceStack, rate_bytes_s: float
                        ) -> tuple[MigrationReport, DestinationStack]:
    """Migrate ``src`` over a byte stream of ``rate_bytes_s`` with auto compression."""
    sa, sb = memory_stream_pair()
    a, b = StreamChannel(RateLimited(sa, rate_bytes_s)), StreamChannel(sb)
    dests: list[DestinationStack] = []
    migrator = Migrator([src.source_device()], a, policy=FAST,
                        auto_compression=AutoCompression(LinkCompression.AUTO))
    receiver = Receiver(b, factory(dests))  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(receiver.run())
        report = await migrator.run()
    assert receiver.report.verified
    return report, dests[0]


async def test_auto_compression_on_a_slow_link_shrinks_the_wire() -> None:
    # 8 MiB of text-like data over a 10 MB/s byte stream: the first window measures the
    # link plain, the samples the data, and the rest goes compressed.
    size = 2048 * BS
    src = source_stack("text", MemoryDevice(size), BS)
    rnd = random.Random(11)
    words = [rnd.randbytes(6).hex().encode() for _ in range(500)]
    text = b" ".join(rnd.choice(words) for _ in range(size // 8))[:size]
    await src.local.write_at(0, text)
    report, dest = await _migrate_auto(src, 10e6)
    assert await snapshot(dest) == text
    stats = report.compression
    assert stats is not None
    assert stats["chunks_compressed"] > stats["chunks"] // 2, stats
    assert report.to_json()["wire_bytes"] < 0.7 * size, stats


async def test_auto_compression_leaves_incompressible_data_plain() -> None:
    src = await make_source("random", 1024 * BS, seed=12)
    report, dest = await _migrate_auto(src, 20e6)
    assert await snapshot(dest) == await snapshot(src)
    assert report.compression is not None
    assert report.compression["chunks_compressed"] == 0
