"""The mirror's checkpoint logic against an in-memory bucket: consistency, no torn
checkpoints after an interrupted upload, S3 away and back."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ferry.s3 import Layout, S3Device
from ferry.s3 import vmcheckpoint as vmc
from ferry.s3.errors import (
    CheckpointNotFoundError,
    ManifestFormatError,
    S3DeviceError,
    S3Error,
)
from ferry.s3.mirror import Mirror, MirrorConfig, MirrorError, VMIdentity, check_prefix_free
from ferry.storage.modules.dirty import DirtyLocal, DirtyRemote, dirty_tracker
from ferry.storage.providers.memory import MemoryDevice
from ferry.testing.memstore import MemoryObjectStore

BLOCK = 64 << 10
OBJECT = 128 << 10
SIZES = {"memory": 1 << 20, "disk.root": 512 << 10}
LAYOUT = Layout(root="vm1/")
IDENTITY = VMIdentity("vm1", "ab" * 32, {"name": "test"}, b"kernel" * 100, b"initramfs" * 10)


class FakeVM:
    """The VM side: a pause yields the current state; ``after_resume`` runs as the VM
    continues (writes the guest makes right after the pause)."""

    def __init__(self) -> None:
        self.state = b"state-0"
        self.pauses = 0
        self.paused_now = False
        self.after_resume: list[Callable[[], Awaitable[None]]] = []

    async def flush(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[bytes]:
        self.pauses += 1
        self.paused_now = True
        try:
            yield self.state
        finally:
            self.paused_now = False
            for later in self.after_resume:
                await later()
            self.after_resume.clear()


class Guest:
    """Devices the fake guest writes (through the mirror's trackers)."""

    def __init__(self) -> None:
        self.local: dict[str, DirtyLocal] = {}
        self.remote: dict[str, DirtyRemote] = {}
        for name, size in SIZES.items():
            self.local[name], self.remote[name] = dirty_tracker(MemoryDevice(size), BLOCK)
            self.remote[name].track_all()

    async def write(self, name: str, offset: int, data: bytes) -> None:
        await self.local[name].write_at(offset, data)

    async def image(self) -> dict[str, bytes]:
        return {n: await d.read_at(0, d.size_bytes) for n, d in self.local.items()}


def _mirror(store: MemoryObjectStore, guest: Guest, vm: FakeVM, *, interval_s: float = 2.0,
            retry_max_s: float = 30.0) -> Mirror:
    return Mirror(store, LAYOUT, guest.remote, vm, IDENTITY, url="s3://b/vm1",
                  config=MirrorConfig(object_size_bytes=OBJECT, interval_s=interval_s,
                                      retry_max_s=retry_max_s))


async def restored(store: MemoryObjectStore) -> tuple[vmc.VMCheckpoint, dict[str, bytes],
                                                      bytes]:
    """What a restore would see: the newest record, its devices' bytes, its state."""
    record = vmc.load_record(store, LAYOUT)
    images = {}
    for name, seq in record.devices.items():
        async with await S3Device.open(store, name, layout=LAYOUT, sequence=seq) as dev:
            images[name] = await dev.read_at(0, dev.size_bytes)
    return record, images, vmc.get_blob(store, LAYOUT, record.files["state"])


async def test_a_checkpoint_holds_the_vm_of_its_pause() -> None:
    store, guest, vm = MemoryObjectStore(), Guest(), FakeVM()
    mirror = _mirror(store, guest, vm)
    await guest.write("memory", 0, os.urandom(3 * BLOCK))
    await guest.write("disk.root", 5 * BLOCK + 17, b"disk bytes")
    at_pause = await guest.image()
    # Right after the pause (the VM runs again while the upload goes on) the guest
    # writes more: that belongs to the next checkpoint, not this one.
    vm.after_resume.append(lambda: guest.write("memory", 100, b"later" * 1000))
    record = await mirror.cycle()
    assert record.sequence == 1
    got, images, state = await restored(store)
    assert got == record
    assert images == at_pause
    assert state == b"state-0"
    assert vmc.get_blob(store, LAYOUT, record.files["kernel"]) == IDENTITY.kernel
    assert mirror.status.checkpoints == 1
    assert mirror.status.last_checkpoint_unix_s == pytest.approx(record.created_unix_s)
    # The next cycle carries the later write (and only the changed objects are uploaded).
    vm.state = b"state-1"
    before = store.puts
    second = await mirror.cycle()
    _, images, state = await restored(store)
    assert second.sequence == 2
    assert images == await guest.image()
    assert state == b"state-1"
    # One object of memory, its manifest, the other device's manifest, the state, the record.
    assert store.puts - before == 5
    await mirror.close()


async def test_an_interrupted_upload_never_makes_a_torn_checkpoint() -> None:
    store, guest, vm = MemoryObjectStore(), Guest(), FakeVM()
    mirror = _mirror(store, guest, vm)
    await guest.write("memory", 0, b"first" * 100)
    await mirror.cycle()
    first = await guest.image()
    for cut_after in range(8):  # S3 goes away after every possible number of writes
        store.down, store.puts_left = False, cut_after
        await guest.write("memory", 2 * OBJECT + cut_after, os.urandom(3 * OBJECT))
        await guest.write("disk.root", OBJECT, os.urandom(BLOCK))
        vm.state = f"state-{cut_after}".encode()
        with pytest.raises((S3Error, S3DeviceError)):
            await mirror.cycle()
        store.down, store.puts_left = False, None
        record, images, state = await restored(store)
        assert record.sequence == 1  # the previous checkpoint stays the newest, intact
        assert images == first
        assert state == b"state-0"
    # S3 is back: the next cycle takes everything written meanwhile.
    record = await mirror.cycle()
    _, images, state = await restored(store)
    assert record.sequence == 2
    assert images == await guest.image()
    assert state == vm.state
    await mirror.close()


@pytest.mark.parametrize("lost", ["vm1/devices/memory/", "vm1/vm/"])
async def test_a_write_that_landed_though_reported_failed_is_taken_up(lost: str) -> None:
    store, guest, vm = MemoryObjectStore(), Guest(), FakeVM()
    mirror = _mirror(store, guest, vm)
    await mirror.cycle()
    await guest.write("memory", OBJECT, b"x" * 100)
    once = [True]

    def lose(key: str) -> bool:
        if key.startswith(lost) and once:
            return once.pop()
        return False

    store.lose_reply = lose
    with pytest.raises((S3Error, S3DeviceError)):
        await mirror.cycle()
    assert mirror.status.checkpoints == 1
    await guest.write("disk.root", 0, b"y" * 100)
    vm.state = b"state-after"
    record = await mirror.cycle()
    _, images, state = await restored(store)
    assert images == await guest.image()
    assert state == b"state-after"
    # A record that landed counts (and is a complete checkpoint of its own pause).
    assert record.sequence == mirror.status.sequence == (3 if lost == "vm1/vm/" else 2)
    assert mirror.status.checkpoints == record.sequence


async def test_s3_away_then_back_the_vm_keeps_going_and_mirroring_resumes() -> None:
    store, guest, vm = MemoryObjectStore(), Guest(), FakeVM()
    mirror = _mirror(store, guest, vm, interval_s=0.02, retry_max_s=0.1)
    task = asyncio.create_task(mirror.run())
    try:
        await _until(lambda: mirror.status.checkpoints >= 2)
        store.down = True
        failing_from = mirror.status.checkpoints
        await _until(lambda: mirror.status.failures >= 2)
        assert mirror.status.state == "failing"
        assert mirror.status.checkpoints == failing_from
        assert "memory store is down" in (mirror.status.last_error or "")
        await guest.write("memory", 7 * OBJECT, b"written while S3 was away")
        grown = mirror.status.recovery_point_s()
        await asyncio.sleep(0.05)
        assert mirror.status.recovery_point_s() > grown  # the recovery point grows
        store.down = False
        await _until(lambda: mirror.status.checkpoints >= failing_from + 1)
        assert mirror.status.state == "mirroring"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    _, images, _ = await restored(store)
    assert images == await guest.image()


async def test_a_prefix_that_holds_a_mirror_is_refused_and_another_writer_stops_it() -> None:
    store, guest, vm = MemoryObjectStore(), Guest(), FakeVM()
    await check_prefix_free(store, LAYOUT)
    mirror = _mirror(store, guest, vm)
    await mirror.cycle()
    with pytest.raises(MirrorError, match="already holds a mirrored VM"):
        await check_prefix_free(store, LAYOUT)
    # Another writer takes the next record first: this mirror stops, it does not
    # overwrite or skip ahead.
    taken = vmc.load_record(store, LAYOUT)
    vmc.write_record(store, LAYOUT, vmc.VMCheckpoint(
        2, taken.created_unix_ns, "other", taken.package_id, taken.manifest, taken.files,
        taken.devices))
    with pytest.raises(MirrorError, match="another writer"):
        await mirror.run()
    assert mirror.status.state == "stopped"


def test_records_round_trip_and_malformed_ones_are_refused() -> None:
    store = MemoryObjectStore()
    with pytest.raises(CheckpointNotFoundError):
        vmc.load_record(store, LAYOUT)
    ref = vmc.put_blob(store, LAYOUT, b"x")
    record = vmc.VMCheckpoint(3, 123, "vm1", "p", {"k": 1},
                              {"kernel": ref, "initramfs": ref, "state": ref}, {"memory": 4})
    vmc.write_record(store, LAYOUT, record)
    assert vmc.load_record(store, LAYOUT) == record
    key = vmc.record_key(LAYOUT, 3)
    good = store.objects[key]
    for bad in (good[:-1], good.replace(b'"sequence": 3', b'"sequence": 2'),
                good.replace(b'"version": 1', b'"version": 9'), b"[]", b"\xff"):
        store.objects[key] = bad
        with pytest.raises(ManifestFormatError):
            vmc.load_record(store, LAYOUT)
    store.objects[key] = good
    store.objects[LAYOUT.object_key(bytes.fromhex(ref.sha256))] = b"y"
    with pytest.raises(Exception, match="SHA-256"):
        vmc.get_blob(store, LAYOUT, ref)


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (a test polling the status)
            await asyncio.sleep(0.01)


async def test_a_busy_vm_is_not_paused_by_the_mirror() -> None:
    store, guest, vm = MemoryObjectStore(), Guest(), FakeVM()
    busy = [False]
    mirror = Mirror(store, LAYOUT, guest.remote, vm, IDENTITY, url="s3://b/vm1",
                    config=MirrorConfig(object_size_bytes=OBJECT, interval_s=0.01,
                                        retry_max_s=0.05),
                    busy=lambda: busy[0])
    await mirror.cycle()
    busy[0] = True  # a live migration has the VM
    task = asyncio.create_task(mirror.run())
    try:
        await asyncio.sleep(0.2)
        assert vm.pauses == 1
        assert mirror.status.checkpoints == 1
        busy[0] = False
        await _until(lambda: mirror.status.checkpoints >= 2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
