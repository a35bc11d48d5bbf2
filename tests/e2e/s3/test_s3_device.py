"""S3Device against a real SeaweedFS: the device contract, checkpoints, reopening,
interrupted checkpoints, deduplication, and objects or manifests that are missing,
truncated, tampered with or malformed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ferry.s3 import (
    CheckpointConflictError,
    CheckpointNotFoundError,
    Layout,
    ManifestFormatError,
    ObjectCache,
    ObjectCorruptError,
    ObjectMissingError,
    ObjectStore,
    S3AuthError,
    S3Credentials,
    S3Device,
    S3DeviceError,
    S3UnreachableError,
    list_checkpoints,
)
from ferry.storage import Device
from ferry.testing.s3 import SeaweedFS
from tests.unit.storage import test_storage_conformance as conformance

pytestmark = pytest.mark.e2e

OBJ = 64 * 1024
SIZE = 10 * OBJ + 1000  # eleven objects, the last one short


# -- the device contract: the conformance suite every provider runs -----------------


@pytest.fixture
async def device(store: ObjectStore, tmp_path: Path) -> AsyncIterator[Device]:
    dev = await S3Device.create(store, "conformance", conformance.SIZE,
                                block_size_bytes=conformance.BS,
                                object_size_bytes=2 * conformance.BS, staging_dir=tmp_path)
    try:
        yield dev
    finally:
        await dev.close()


test_is_a_device_of_the_right_size = conformance.test_is_a_device_of_the_right_size
test_starts_zeroed = conformance.test_starts_zeroed
test_round_trip_at_odd_offsets = conformance.test_round_trip_at_odd_offsets
test_accepts_any_buffer = conformance.test_accepts_any_buffer
test_zero_length_operations = conformance.test_zero_length_operations
test_read_outside_raises_range_error = conformance.test_read_outside_raises_range_error
test_write_outside_raises_and_changes_nothing = (
    conformance.test_write_outside_raises_and_changes_nothing)
test_short_last_block = conformance.test_short_last_block
test_random_operations_match_a_model = conformance.test_random_operations_match_a_model
test_close_is_idempotent_and_final = conformance.test_close_is_idempotent_and_final


# -- helpers ------------------------------------------------------------------------


async def new_device(store: ObjectStore, tmp_path: Path, name: str = "disk",
                     **kwargs: Any) -> S3Device:
    return await S3Device.create(store, name, SIZE, block_size_bytes=4096,
                                 object_size_bytes=OBJ, staging_dir=tmp_path, **kwargs)


async def reopen(store: ObjectStore, tmp_path: Path, name: str = "disk",
                 **kwargs: Any) -> S3Device:
    """The device as a fresh process would see it: a new client, cache and staging."""
    return await S3Device.open(store, name, staging_dir=tmp_path, cache=ObjectCache(),
                               **kwargs)


async def scribble(dev: S3Device, seed: int, writes: int = 40) -> bytes:
    """Random writes (some across object boundaries, some whole objects); the image."""
    rng = random.Random(seed)
    model = bytearray(await dev.read_at(0, dev.size_bytes))
    for _ in range(writes):
        if rng.random() < 0.2:
            i = rng.randrange(SIZE // OBJ)
            offset, data = i * OBJ, rng.randbytes(OBJ)
        else:
            offset = rng.randrange(SIZE)
            data = rng.randbytes(rng.randrange(1, min(3 * OBJ, SIZE - offset) + 1))
        await dev.write_at(offset, data)
        model[offset:offset + len(data)] = data
    return bytes(model)


def object_keys(store: ObjectStore) -> dict[str, int]:
    return {o.key: o.size_bytes for o in store.list("ferry/objects/")}


def put_hook(store: ObjectStore, event: str, handler: Callable[..., None]) -> Callable[[], None]:
    """Run ``handler`` on every PutObject (botocore's own event system: a fault at the
    HTTP boundary, not a stand-in for ferry code); returns the unregister call."""
    name = f"{event}.s3.PutObject"
    store.client.meta.events.register(name, handler)
    return lambda: store.client.meta.events.unregister(name, handler)


# -- checkpoints and reopening --------------------------------------------------------


async def test_write_checkpoint_reopen_same_bytes(store: ObjectStore, tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path)
    image = await scribble(dev, 1)
    report = await dev.checkpoint()
    assert report.sequence == 2
    assert report.objects_dirty == report.objects_uploaded + report.holes \
        + report.objects_deduplicated
    assert report.bytes_uploaded > 0
    await dev.close()
    again = await reopen(store, tmp_path)
    assert again.manifest.sequence == 2
    assert await again.read_at(0, SIZE) == image
    await again.close()


async def test_reads_are_lazy_and_the_cache_is_bounded(store: ObjectStore,
                                                       tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path)
    for i in range(SIZE // OBJ):
        await dev.write_at(i * OBJ, bytes([i + 1]) * OBJ)
    image = await dev.read_at(0, SIZE)
    await dev.close()
    cache = ObjectCache(capacity_bytes=3 * OBJ)
    again = await S3Device.open(store, "disk", staging_dir=tmp_path, cache=cache)
    assert await again.read_at(5 * OBJ + 7, 3) == image[5 * OBJ + 7:5 * OBJ + 10]
    assert again.fetched_objects == 1
    assert await again.read_at(SIZE - 1000, 1000) == bytes(1000)  # a hole: no request
    assert again.fetched_objects == 1
    assert await again.read_at(0, SIZE) == image
    assert cache.size_bytes <= 3 * OBJ
    await again.close()


async def test_concurrent_readers_of_one_object_share_one_request(store: ObjectStore,
                                                                  tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path)
    await dev.write_at(0, os.urandom(2 * OBJ))
    image = await dev.read_at(0, 2 * OBJ)
    await dev.close()
    again = await reopen(store, tmp_path)
    reads = await asyncio.gather(*(again.read_at(o, 100) for o in range(0, 2 * OBJ, OBJ // 4)))
    assert b"".join(reads) == b"".join(image[o:o + 100] for o in range(0, 2 * OBJ, OBJ // 4))
    assert again.fetched_objects == 2
    await again.close()


async def test_older_checkpoints_stay_readable(store: ObjectStore, tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path)
    first = await scribble(dev, 3)
    await dev.checkpoint()
    second = await scribble(dev, 4)
    await dev.close()  # close checkpoints
    assert list_checkpoints(store, "disk") == [3, 2, 1]
    old = await reopen(store, tmp_path, sequence=2)
    assert await old.read_at(0, SIZE) == first
    await old.close(checkpoint=False)
    new = await reopen(store, tmp_path)
    assert await new.read_at(0, SIZE) == second
    await new.close()


async def test_partial_write_to_a_stored_object_keeps_the_rest(store: ObjectStore,
                                                               tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path)
    await dev.write_at(OBJ, b"a" * OBJ)
    await dev.close()
    again = await reopen(store, tmp_path)
    await again.write_at(OBJ + 10, b"bb")
    assert await again.read_at(OBJ, 14) == b"a" * 10 + b"bb" + b"aa"
    await again.close()
    third = await reopen(store, tmp_path)
    assert await third.read_at(OBJ, OBJ) == b"a" * 10 + b"bb" + b"a" * (OBJ - 12)
    await third.close()


async def test_zeroed_objects_become_holes(store: ObjectStore, tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path)
    await dev.write_at(0, b"x" * OBJ)
    await dev.checkpoint()
    await dev.write_at(0, bytes(OBJ))
    report = await dev.checkpoint()
    assert (report.holes, report.objects_uploaded) == (1, 0)
    assert dev.manifest.objects[0] is None
    await dev.close()


async def test_identical_objects_are_stored_once(store: ObjectStore, tmp_path: Path) -> None:
    a = await new_device(store, tmp_path, "a")
    for i in range(4):
        await a.write_at(i * OBJ, b"same" * (OBJ // 4))
    await a.write_at(4 * OBJ, b"other" + bytes(OBJ - 5))
    report = await a.checkpoint()
    # Four objects of one content and one of another: two uploads, three skipped.
    assert (report.objects_uploaded, report.bytes_uploaded) == (2, 2 * OBJ)
    assert (report.objects_deduplicated, report.bytes_deduplicated) == (3, 3 * OBJ)
    await a.close()
    b = await new_device(store, tmp_path, "b")  # another device, same content
    for i in range(4):
        await b.write_at(i * OBJ, b"same" * (OBJ // 4))
    report = await b.checkpoint()
    assert (report.objects_uploaded, report.objects_deduplicated) == (0, 4)
    assert len(object_keys(store)) == 2
    await b.close()


async def test_checkpoint_is_of_the_moment_it_started(store: ObjectStore,
                                                      tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path, concurrency=1)
    for i in range(4):
        await dev.write_at(i * OBJ, b"A" * OBJ)
    started, go = threading.Event(), threading.Event()

    def hold_first_upload(**_: Any) -> None:
        started.set()
        go.wait(60)

    unhook = put_hook(store, "before-call", hold_first_upload)
    try:
        task = asyncio.create_task(dev.checkpoint())
        assert await asyncio.to_thread(started.wait, 60)
        for i in range(4):  # while object 0 uploads: rewrite all four
            await dev.write_at(i * OBJ + 1, b"B")
        go.set()
        report = await task
    finally:
        go.set()
        unhook()
    assert report.objects_dirty == 4
    assert dev.dirty_objects == 4  # the rewrites are for the next checkpoint
    assert await dev.read_at(OBJ, 2) == b"AB"
    await dev.close()  # checkpoint 3: the rewrites
    at_start = await reopen(store, tmp_path, sequence=2)
    assert await at_start.read_at(0, 4 * OBJ) == b"A" * 4 * OBJ
    await at_start.close(checkpoint=False)
    latest = await reopen(store, tmp_path)
    assert await latest.read_at(3 * OBJ, 2) == b"AB"
    await latest.close()


async def test_flush_waits_for_the_running_checkpoint(store: ObjectStore,
                                                     tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path)
    await dev.write_at(0, b"durable")
    started, go = threading.Event(), threading.Event()

    def hold(**_: Any) -> None:
        started.set()
        go.wait(60)

    unhook = put_hook(store, "before-call", hold)
    try:
        checkpoint = asyncio.create_task(dev.checkpoint())
        assert await asyncio.to_thread(started.wait, 60)
        assert dev.dirty_objects == 0  # the write is the running checkpoint's now
        flush = asyncio.create_task(dev.flush())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not flush.done()  # its write is not in S3 yet
        go.set()
        await flush
        assert checkpoint.done()
    finally:
        go.set()
        unhook()
    assert list_checkpoints(store, "disk") == [2, 1]  # and no extra, empty checkpoint
    await dev.close()


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_checkpoints_racing_random_writes_are_point_in_time(
        store: ObjectStore, tmp_path: Path, seed: int) -> None:
    """A writer never waits for checkpoints; each checkpoint must equal the device's
    image at the moment it was started, whatever the writes did meanwhile. (How many
    checkpoints fit in the run depends on the machine; what each holds must not.)"""
    rng = random.Random(seed)
    obj = 4096
    size = 24 * obj + 100
    dev = await S3Device.create(store, "racy", size, block_size_bytes=4096,
                                object_size_bytes=obj, staging_dir=tmp_path, concurrency=2)
    model = bytearray(size)
    expected: dict[int, bytes] = {1: bytes(size)}
    running: list[asyncio.Task[Any]] = []
    for step in range(400):
        if step % 20 == 10 and all(t.done() for t in running):
            # (A checkpoint called while another runs starts when that one ends.)
            expected[len(running) + 2] = bytes(model)
            running.append(asyncio.create_task(dev.checkpoint()))
            await asyncio.sleep(0)  # the checkpoint starts: its moment is now
        offset = rng.randrange(size)
        data = rng.randbytes(rng.randrange(1, min(3 * obj, size - offset) + 1))
        await dev.write_at(offset, data)
        model[offset:offset + len(data)] = data
        if rng.random() < 0.3:
            await asyncio.sleep(0.001)  # let uploads progress between writes
    reports = await asyncio.gather(*running)
    assert [r.sequence for r in reports] == sorted(expected)[1:]
    await dev.close()  # the last writes: one more checkpoint
    expected[dev.manifest.sequence] = bytes(model)
    assert reports[0].objects_dirty > 1
    for sequence, image in expected.items():
        seen = await S3Device.open(store, "racy", sequence=sequence, staging_dir=tmp_path)
        assert await seen.read_at(0, size) == image, f"checkpoint {sequence}"
        await seen.close(checkpoint=False)


# -- interrupted checkpoints ----------------------------------------------------------


async def test_failed_checkpoint_leaves_the_previous_one(store: ObjectStore,
                                                         tmp_path: Path) -> None:
    dev = await new_device(store, tmp_path, concurrency=2)
    first = await scribble(dev, 5)
    await dev.checkpoint()
    second = await scribble(dev, 6, writes=60)
    puts = 0

    def fail_after_three(**_: Any) -> None:
        nonlocal puts
        puts += 1
        if puts > 3:
            # What botocore raises when the link breaks (after its own retries).
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="injected-fault")

    unhook = put_hook(store, "before-call", fail_after_three)
    try:
        with pytest.raises(S3DeviceError, match="injected-fault") as info:
            await dev.checkpoint()
    finally:
        unhook()
    assert isinstance(info.value.__cause__, S3UnreachableError)
    assert puts > 3  # it failed part-way, after uploading objects
    assert list_checkpoints(store, "disk") == [2, 1]
    other = await reopen(store, tmp_path)
    assert await other.read_at(0, SIZE) == first
    await other.close(checkpoint=False)
    assert await dev.read_at(0, SIZE) == second  # nothing lost here either
    report = await dev.checkpoint()  # and the retry completes it
    assert report.sequence == 3
    await dev.close()
    latest = await reopen(store, tmp_path)
    assert await latest.read_at(0, SIZE) == second
    await latest.close()


KILLED_WRITER = textwrap.dedent("""
    import asyncio, os, random, signal, sys
    from ferry.s3 import ObjectStore, S3Config, S3Credentials, S3Device

    endpoint, key_id, secret, bucket, staging = sys.argv[1:6]
    config = S3Config(endpoint_url=endpoint, region="us-east-1",
                      credentials=S3Credentials(key_id, secret))
    store = ObjectStore.connect(config, bucket)
    OBJ = 64 * 1024

    async def main():
        dev = await S3Device.create(store, "disk", 32 * OBJ, block_size_bytes=4096,
                                    object_size_bytes=OBJ, staging_dir=staging,
                                    concurrency=2)
        await dev.write_at(0, b"A" * 32 * OBJ)
        await dev.checkpoint()  # checkpoint 2: all A (one object, deduplicated)
        rng = random.Random(7)
        for i in range(32):
            await dev.write_at(i * OBJ, rng.randbytes(OBJ))
        done = 0
        def kill_after_three(**_):
            nonlocal done
            done += 1
            if done == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        store.client.meta.events.register("after-call.s3.PutObject", kill_after_three)
        await dev.checkpoint()
        print("not killed")

    asyncio.run(main())
""")


def test_writer_killed_mid_checkpoint_leaves_the_previous_one(seaweedfs: SeaweedFS,
                                                              store: ObjectStore,
                                                              tmp_path: Path) -> None:
    creds = seaweedfs.credentials
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, seaweedfs.endpoint_url,
                           creds.access_key_id, creds.secret_access_key, store.bucket,
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(object_keys(store)) >= 1 + 3  # A, and three of the new objects
    assert list_checkpoints(store, "disk") == [2, 1]
    assert not list(tmp_path.iterdir())  # the dead writer left no local files

    async def check() -> None:
        dev = await S3Device.open(store, "disk", staging_dir=tmp_path)
        assert dev.manifest.sequence == 2
        assert await dev.read_at(0, dev.size_bytes) == b"A" * dev.size_bytes
        await dev.close()

    asyncio.run(check())


# -- bad objects, bad manifests, bad endpoints ------------------------------------------


async def stored_device(store: ObjectStore, tmp_path: Path) -> tuple[bytes, str]:
    """A checkpointed device with distinct objects; its image and one object key."""
    dev = await new_device(store, tmp_path)
    for i in range(4):
        await dev.write_at(i * OBJ, os.urandom(OBJ))
    image = await dev.read_at(0, SIZE)
    await dev.close()
    digest = hashlib.sha256(image[2 * OBJ:3 * OBJ]).digest()
    return image, Layout().object_key(digest)


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
async def test_damaged_object_is_refused_and_nothing_is_lost(
        store: ObjectStore, tmp_path: Path, damage: str) -> None:
    image, key = await stored_device(store, tmp_path)
    original = store.get(key, max_bytes=OBJ)
    bad = {"flip": bytes([original[0] ^ 1]) + original[1:], "truncate": original[:-1],
           "extend": original + b"x"}[damage]
    store.put(key, bad)
    before = object_keys(store), list_checkpoints(store, "disk")
    dev = await reopen(store, tmp_path)
    assert await dev.read_at(0, 2 * OBJ) == image[:2 * OBJ]  # other objects still read
    with pytest.raises(ObjectCorruptError, match=key) as info:
        await dev.read_at(2 * OBJ + 5, 1)
    assert info.value.key == key
    if damage != "flip":
        with pytest.raises(ObjectCorruptError):
            await dev.verify()
    await dev.close()
    assert (object_keys(store), list_checkpoints(store, "disk")) == before
    store.put(key, original)  # repaired: the same checkpoint reads again
    dev = await reopen(store, tmp_path)
    assert await dev.read_at(0, SIZE) == image
    await dev.close()


async def test_missing_object_is_a_typed_error(store: ObjectStore, tmp_path: Path) -> None:
    _, key = await stored_device(store, tmp_path)
    store.delete(key)
    dev = await reopen(store, tmp_path)
    with pytest.raises(ObjectMissingError, match="not in the bucket"):
        await dev.verify()
    with pytest.raises(ObjectMissingError, match=key):
        await dev.read_at(2 * OBJ, 1)
    with pytest.raises(ObjectMissingError):  # a partial write needs the object's bytes too
        await dev.write_at(2 * OBJ, b"x")
    await dev.close()
    assert list_checkpoints(store, "disk") == [2, 1]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-sequence"])
async def test_malformed_newest_manifest_is_refused_not_skipped(
        store: ObjectStore, tmp_path: Path, damage: str) -> None:
    image, _ = await stored_device(store, tmp_path)
    layout = Layout()
    good = store.get(layout.manifest_key("disk", 2), max_bytes=1 << 20)
    bad = {"garbage": b"not a manifest", "truncated": good[:-1],
           "wrong-sequence": good}[damage]
    store.put(layout.manifest_key("disk", 3), bad)
    with pytest.raises(ManifestFormatError, match=r"older checkpoints: \[2, 1\]") as info:
        await reopen(store, tmp_path)
    assert info.value.key == layout.manifest_key("disk", 3)
    assert info.value.device == "disk"
    dev = await reopen(store, tmp_path, sequence=2)
    assert await dev.read_at(0, SIZE) == image
    await dev.close(checkpoint=False)
    assert list_checkpoints(store, "disk") == [3, 2, 1]  # nothing was removed


async def test_oversized_manifest_is_not_read(store: ObjectStore, tmp_path: Path) -> None:
    await (await new_device(store, tmp_path)).close()
    from ferry.s3 import manifest as mf

    store.put(Layout().manifest_key("disk", 2), bytes(mf.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ManifestFormatError, match="more than"):
        await reopen(store, tmp_path)


async def test_no_checkpoint_and_existing_names(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        await reopen(store, tmp_path, name="nothing")
    await (await new_device(store, tmp_path)).close()
    with pytest.raises(CheckpointConflictError, match="already exists"):
        await new_device(store, tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint 9"):
        await reopen(store, tmp_path, sequence=9)
    store.put("ferry/devices/disk/0-not-a-manifest", b"junk")  # listed before any manifest
    assert list_checkpoints(store, "disk") == [1]
    await (await reopen(store, tmp_path)).close()


async def test_second_writer_of_a_sequence_loses(store: ObjectStore, tmp_path: Path) -> None:
    await (await new_device(store, tmp_path)).close()
    one = await reopen(store, tmp_path)
    two = await reopen(store, tmp_path)
    await one.write_at(0, b"one")
    await two.write_at(0, b"two")
    await one.checkpoint()
    with pytest.raises(CheckpointConflictError, match="another writer"):
        await two.checkpoint()
    await one.close()
    await two.close(checkpoint=False)
    latest = await reopen(store, tmp_path)
    assert await latest.read_at(0, 3) == b"one"
    await latest.close()


def test_wrong_credentials_name_the_endpoint(seaweedfs: SeaweedFS, store: ObjectStore) -> None:
    config = replace(seaweedfs.config(), credentials=S3Credentials(
        seaweedfs.credentials.access_key_id, "wrong"))
    bad = ObjectStore.connect(config, store.bucket)
    with pytest.raises(S3AuthError, match=seaweedfs.endpoint_url) as info:
        list(bad.list(""))
    assert "credentials" in str(info.value)
    anonymous = ObjectStore.connect(replace(config, credentials=S3Credentials("nobody", "x")),
                                    store.bucket)
    with pytest.raises(S3AuthError):
        anonymous.get("anything", max_bytes=10)


def test_unreachable_endpoint_is_a_typed_error(seaweedfs: SeaweedFS) -> None:
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        config = replace(seaweedfs.config(), endpoint_url=f"http://127.0.0.1:{port}",
                         max_attempts=1, connect_timeout_s=1.0)
        with pytest.raises(S3UnreachableError, match=f"127.0.0.1:{port}"):
            ObjectStore.connect(config, "bucket").size_of("key")
