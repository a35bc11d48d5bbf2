"""The launch exchange against a hostile source: typed errors, nothing written outside the
boot cache, bounded cache, registry refusals, idle peers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path

import pytest

from ferry.errors import DeadlineError, RemoteProtocolError
from ferry.live import launch
from ferry.live.bootcache import BootCache, BootCacheFullError
from ferry.live.errors import RefusedError
from ferry.live.rampath import RamPath
from ferry.testing.live import HOSTILE_OFFERS, INITRAMFS, KERNEL, frame, sample_offer
from ferry.transport.base import Stream
from ferry.transport.memory import memory_stream_pair


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("name", sorted(HOSTILE_OFFERS))
async def test_hostile_offers_are_refused_before_anything_is_written(
        tmp_path: Path, name: str) -> None:
    cache_root = tmp_path / "state" / "boot-cache"
    before = _tree(tmp_path)
    a, b = memory_stream_pair()
    sender = asyncio.create_task(a.send_all(frame(HOSTILE_OFFERS[name]())))
    with pytest.raises(RemoteProtocolError):
        await launch.receive_offer(b, BootCache(cache_root))
    await sender
    assert _tree(tmp_path) == before  # not even the cache directory


async def _send_files(stream: Stream, offer: dict[str, object],
                      data: dict[str, bytes]) -> list[str]:
    await stream.send_all(frame(offer))
    need = (await launch.receive_frame(stream))["need"]
    for name in need:
        await stream.send_all(data[name])
    return list(need)


async def test_boot_files_are_cached_0600_pinned_and_asked_for_once(tmp_path: Path) -> None:
    cache = BootCache(tmp_path / "cache", holder="one")
    data = {"kernel": KERNEL, "initramfs": INITRAMFS}
    a, b = memory_stream_pair()
    sent, (offer, boot_dir) = await asyncio.gather(
        _send_files(a, sample_offer(), data), launch.receive_offer(b, cache))
    assert sorted(sent) == ["initramfs", "kernel"]
    files = launch.boot_files(offer.manifest, boot_dir)
    assert files["kernel"].read_bytes() == KERNEL
    assert files["initramfs"].read_bytes() == INITRAMFS
    for path in files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_nlink == 2  # the cache entry and this VM's pin
    again = BootCache(tmp_path / "cache", holder="two")
    a, b = memory_stream_pair()
    sent, _ = await asyncio.gather(_send_files(a, sample_offer(), data),
                                   launch.receive_offer(b, again))
    assert sent == []


async def test_a_boot_file_that_does_not_match_its_hash_is_not_kept(tmp_path: Path) -> None:
    cache = BootCache(tmp_path / "cache")
    a, b = memory_stream_pair()
    forged = {"kernel": b"X" * len(KERNEL), "initramfs": INITRAMFS}
    sender = asyncio.create_task(_send_files(a, sample_offer(), forged))
    with pytest.raises(RemoteProtocolError, match="SHA-256"):
        await launch.receive_offer(b, cache)
    await sender
    assert [e.path.name for e in cache.entries()] == []
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


async def _arrive(cache: BootCache, i: int) -> None:
    kernel, initramfs = KERNEL + bytes([i]), INITRAMFS + bytes([i])
    a, b = memory_stream_pair()
    await asyncio.gather(_send_files(a, sample_offer(kernel, initramfs),
                                     {"kernel": kernel, "initramfs": initramfs}),
                         launch.receive_offer(b, cache))


async def test_many_boot_files_stay_within_the_bound(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    for i in range(10):
        cache = BootCache(root, max_files=4, holder=f"h{i}")
        await _arrive(cache, i)
        cache.release()  # that VM is gone: its files may be evicted
        assert len(cache.entries()) <= 4
    newest = {hashlib.sha256(KERNEL + bytes([9])).hexdigest()}
    assert newest <= {e.path.name for e in cache.entries()}


async def test_files_in_use_are_never_evicted_and_a_full_cache_refuses(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    holders = [BootCache(root, max_files=4, holder=f"vm{i}") for i in range(2)]
    for i, cache in enumerate(holders):
        await _arrive(cache, i)  # both VMs keep running: 4 pinned files
    with pytest.raises(BootCacheFullError):
        await _arrive(BootCache(root, max_files=4, holder="vm2"), 2)
    assert len(holders[0].entries()) == 4
    for cache in holders:
        for path in cache.pin_dir.rglob("*"):
            if path.is_file():
                assert path.stat().st_nlink == 2


async def test_a_byte_bound_refuses_a_file_larger_than_the_cache(tmp_path: Path) -> None:
    cache = BootCache(tmp_path / "cache", max_bytes=len(KERNEL) - 1)
    a, b = memory_stream_pair()
    sender = asyncio.create_task(_send_files(a, sample_offer(),
                                             {"kernel": KERNEL, "initramfs": INITRAMFS}))
    with pytest.raises(BootCacheFullError):
        await launch.receive_offer(b, cache)
    sender.cancel()


async def test_a_registry_refusal_is_a_typed_error(tmp_path: Path) -> None:
    a, b = memory_stream_pair()
    await launch.send_refusal(a, "registry: no package 'x.ferry' here")
    with pytest.raises(RefusedError, match="no package"):
        await launch.receive_offer(b, BootCache(tmp_path / "cache"))


async def test_a_silent_peer_hits_the_idle_deadline(tmp_path: Path) -> None:
    _, b = memory_stream_pair()
    with pytest.raises(DeadlineError):
        await launch.receive_offer(b, BootCache(tmp_path / "cache"), idle_timeout_s=0.05)


async def test_a_peer_stalling_inside_a_boot_file_hits_the_idle_deadline(tmp_path: Path) -> None:
    a, b = memory_stream_pair()

    async def stall() -> None:
        await a.send_all(frame(sample_offer()))
        await launch.receive_frame(a)
        await a.send_all(KERNEL[:10])  # ... and nothing more

    sender = asyncio.create_task(stall())
    with pytest.raises(DeadlineError):
        await launch.receive_offer(b, BootCache(tmp_path / "cache"), idle_timeout_s=0.05)
    await sender


@pytest.mark.parametrize("head", [b"GET / HTTP/1.1\r\n", launch._HEAD.pack(launch.MAGIC, 2**32 - 1),
                                  launch._HEAD.pack(b"FLX1", 5) + b"[[[[["])
async def test_garbage_frames_are_protocol_errors(tmp_path: Path, head: bytes) -> None:
    a, b = memory_stream_pair()

    async def send() -> None:
        await a.send_all(head)
        await a.send_eof()

    sender = asyncio.create_task(send())
    with pytest.raises(RemoteProtocolError):
        await launch.receive_frame(b)
    sender.cancel()


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        launch.decode_body(b"[" * 200_000)


def test_offer_round_trip() -> None:
    offer = launch.Offer.from_json(sample_offer())
    assert launch.Offer.from_json(offer.to_json()) == offer
    assert offer.ram is RamPath.ENGINE  # an offer without "ram" (an older source)
    qemu = launch.Offer.from_json({**sample_offer(), "ram": "qemu"})
    assert qemu.ram is RamPath.QEMU
    assert launch.Offer.from_json(qemu.to_json()) == qemu
    assert os.sep not in offer.boot_file("kernel").sha256


def test_an_offer_carries_the_service_address() -> None:
    offer = launch.Offer.from_json({**sample_offer(), "service_address": "10.77.0.231"})
    assert offer.service_address == "10.77.0.231"
    assert launch.Offer.from_json(offer.to_json()) == offer
    assert launch.Offer.from_json(sample_offer()).service_address is None


@pytest.mark.parametrize("changes", [{"ram": "ramdisk"}, {"ram": 3},
                                     {"ram": "qemu", "origin": "registry"},
                                     {"service_address": "127.0.0.1"},
                                     {"service_address": 17},
                                     {"service_address": "10.77.0.231/24"}])
def test_an_offer_s_ram_path_is_checked(changes: dict[str, object]) -> None:
    with pytest.raises(RemoteProtocolError):
        launch.Offer.from_json({**sample_offer(), **changes})
