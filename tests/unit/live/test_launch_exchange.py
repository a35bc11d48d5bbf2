"""The live layer's own framing, both sides in memory: the launch exchange (offer, boot files
answered from the destination's cache, READY or a refusal) and, after the migration, the report
exchange (clock probes, the report frame), with a peer that breaks the rules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.errors import FrameTooLargeError, RemoteProtocolError
from ferry.live import launch, report_exchange
from ferry.live.bootcache import BootCache
from ferry.live.report import DestinationReport
from ferry.live.timeline import Mark, Side, Timeline
from ferry.migration.destination import ReceiveReport
from ferry.net import PortForward
from ferry.testing.live import INITRAMFS, KERNEL, sample_manifest
from ferry.transport.base import Stream
from ferry.transport.memory import memory_stream_pair

OFFSET_S = 1e6
"""The destination's clock reads this much more than the source's (another boot)."""


def destination_clock() -> float:
    return time.monotonic() + OFFSET_S


def boot_files(root: Path) -> dict[str, Path]:
    files = {"kernel": root / "boot" / "vmlinuz", "initramfs": root / "boot" / "initramfs.cpio"}
    files["kernel"].parent.mkdir(parents=True, exist_ok=True)
    files["kernel"].write_bytes(KERNEL)
    files["initramfs"].write_bytes(INITRAMFS)
    return files


def offer_for(files: dict[str, Path]) -> launch.Offer:
    return launch.Offer("r1", sample_manifest(), (PortForward("127.0.0.1", 16379, 6379),),
                        launch.describe_boot(files))


def arrived_report() -> DestinationReport:
    timeline = Timeline(Side.DESTINATION, clock=destination_clock)
    for mark in (Mark.HANDOFF_RECEIVED, Mark.STATE_LOADED, Mark.RUNNING):
        timeline.mark(mark)
    return DestinationReport("r1", outcome="completed", handed_off=True, timeline=timeline,
                             qemu_spawn_ms=41.5, clock_offset_ns=-1200,
                             receive=ReceiveReport(devices=["memory", "disk/root"],
                                                   bytes_received=1 << 20, verified=True,
                                                   handoff_at_s=1.25, outcome="completed"))


async def _destination(stream: Stream, cache: BootCache,
                       report: DestinationReport) -> tuple[launch.Offer, Path]:
    offer, boot_dir = await launch.receive_offer(stream, cache)
    await launch.send_ready(stream)
    # ... the migration protocol would run here ...
    await report_exchange.serve_report(stream, report, clock=destination_clock)
    return offer, boot_dir


async def test_launch_then_report_exchange(tmp_path: Path) -> None:
    files = boot_files(tmp_path / "pkg")
    offer = offer_for(files)
    report = arrived_report()
    a, b = memory_stream_pair()

    async def source() -> tuple[DestinationReport, Any]:
        await launch.send_offer(a, offer, files)
        return await report_exchange.fetch_report(a)

    (got, clock), (received, boot_dir) = await asyncio.gather(
        source(), _destination(b, BootCache(tmp_path / "cache"), report))
    assert received == offer
    paths = launch.boot_files(received.manifest, boot_dir)
    assert paths["kernel"].read_bytes() == KERNEL
    assert paths["initramfs"].read_bytes() == INITRAMFS
    assert got.to_json() == report.to_json()
    assert got.verified
    assert got.handoff_to_running_ms == report.handoff_to_running_ms
    assert clock.samples == report_exchange.CLOCK_PROBES
    assert abs(clock.offset_s - OFFSET_S) <= clock.uncertainty_s(clock.measured_at_s)


async def test_the_boot_cache_answers_the_second_offer(tmp_path: Path) -> None:
    files = boot_files(tmp_path / "pkg")
    offer = offer_for(files)
    for hop in range(2):
        # On the second hop the files are gone at the source: asking for them would fail.
        a, b = memory_stream_pair()
        cache = BootCache(tmp_path / "cache", holder=f"hop{hop}")
        _, (_, boot_dir) = await asyncio.gather(
            _source_without_report(a, offer, files), _offer_only(b, cache))
        assert launch.boot_files(offer.manifest, boot_dir)["kernel"].read_bytes() == KERNEL
        for path in files.values():
            path.unlink(missing_ok=True)


async def _source_without_report(stream: Stream, offer: launch.Offer,
                                 files: dict[str, Path]) -> None:
    await launch.send_offer(stream, offer, files)


async def _offer_only(stream: Stream, cache: BootCache) -> tuple[launch.Offer, Path]:
    offer, boot_dir = await launch.receive_offer(stream, cache)
    await launch.send_ready(stream)
    return offer, boot_dir


async def test_a_refusal_reaches_the_source_as_a_typed_error(tmp_path: Path) -> None:
    files = boot_files(tmp_path / "pkg")
    a, b = memory_stream_pair()

    async def refuse() -> None:
        await launch.receive_offer(b, BootCache(tmp_path / "cache"))
        await launch.send_ready(b, "vm r1 is already running on this host")

    with pytest.raises(RemoteProtocolError, match="already running"):
        await asyncio.gather(launch.send_offer(a, offer_for(files), files), refuse())


class OneByteAtATime:
    """A Stream whose receives return one byte: every split point of a frame is tried."""

    def __init__(self, inner: Stream) -> None:
        self._inner = inner
        self.peer = inner.peer

    async def send_all(self, data: bytes) -> None:
        await self._inner.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._inner.receive_some(1)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_the_report_frame_split_at_every_byte() -> None:
    a, b = memory_stream_pair()
    report = arrived_report()
    (got, _), _ = await asyncio.gather(
        report_exchange.fetch_report(OneByteAtATime(a), probes=1),  # type: ignore[arg-type]
        report_exchange.serve_report(OneByteAtATime(b), report))  # type: ignore[arg-type]
    assert got.to_json() == report.to_json()


# -- a destination (or source) that breaks the rules ---------------------------------------

Answer = Callable[[dict[str, Any]], dict[str, Any]]


async def _fetch_against(answer: Answer) -> None:
    """fetch_report against a destination answering every frame with ``answer(frame)``."""
    a, b = memory_stream_pair()

    async def peer() -> None:
        while True:
            await launch.send_frame(b, answer(await launch.receive_frame(b)))

    task = asyncio.create_task(peer())
    try:
        await report_exchange.fetch_report(a, probes=2)
    finally:
        task.cancel()


def _reply(t1: float, t2: float, t3: float) -> dict[str, Any]:
    return {"clock_reply": [t1, t2, t3]}


@pytest.mark.parametrize("answer", [
    lambda f: _reply(f["clock_probe"] + 1, 5.0, 5.0),            # not our probe's t1
    lambda f: _reply(f["clock_probe"], 5.0, 4.0),                # its clock ran backwards
    lambda f: _reply(f["clock_probe"], 0.0, 3600.0),             # held longer than the trip
    lambda f: {"clock_reply": [f["clock_probe"], 1.0]},
    lambda f: {"clock_reply": [f["clock_probe"], "1", 2.0]},
    lambda f: {"clock_reply": [f["clock_probe"], 1.0, 2.0], "extra": 1},
    lambda f: {"report": arrived_report().to_json()},            # a report before the probes
    lambda f: {"hello": 1},
], ids=["wrong echo", "backwards", "held too long", "short reply", "string stamp",
        "two keys", "report too early", "unknown"])
async def test_bad_clock_replies_are_refused(answer: Answer) -> None:
    with pytest.raises(RemoteProtocolError):
        await _fetch_against(answer)


def _report_answer(report: object) -> Answer:
    def answer(frame: dict[str, Any]) -> dict[str, Any]:
        if "clock_probe" in frame:
            return _reply(frame["clock_probe"], 1.0, 1.0)
        return {"report": report}
    return answer


def _good() -> dict[str, Any]:
    return arrived_report().to_json()


def _with(**changes: Any) -> dict[str, Any]:
    return {**_good(), **changes}


@pytest.mark.parametrize("report", [
    [], _with(vm=7), {k: v for k, v in _good().items() if k != "vm"},
    _with(vm="x" * 5000), _with(qemu_spawn_ms=float("nan")), _with(state_bytes=1.5),
    _with(state_bytes=True), _with(handed_off="yes"),
    _with(timeline={"pause": 1.0}),
    _with(timeline={"running": "soon"}), _with(receive=[]),
    _with(receive={"devices": "memory"}), _with(receive={"devices": ["m"] * 100}),
    _with(receive={"verified": 1}),
], ids=["not an object", "vm a number", "vm missing", "vm too long", "nan", "bytes a float",
        "bytes a bool", "handed_off a string",
        "a source mark", "a mark not a number", "receive a list", "devices a string",
        "100 devices", "verified an int"])
async def test_malformed_reports_are_refused(report: object) -> None:
    with pytest.raises(RemoteProtocolError):
        await _fetch_against(_report_answer(report))


async def test_an_oversized_report_frame_is_refused_before_it_is_read() -> None:
    a, b = memory_stream_pair()
    body = json.dumps({"report": _good()}).encode()
    head = launch.MAGIC + (launch.MAX_FRAME_BYTES + 1).to_bytes(4, "big")

    async def peer() -> None:
        await launch.receive_frame(b)
        await b.send_all(head + body)

    task = asyncio.create_task(peer())
    with pytest.raises(FrameTooLargeError):
        await report_exchange.fetch_report(a, probes=1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("frames", [
    [{"report": _good()}],                               # a report from the source
    [{"report_request": False}],
    [{"clock_probe": float("inf")}],
    [{"clock_probe": 1.0}] * (report_exchange.MAX_CLOCK_PROBES + 1),
], ids=["report", "request false", "infinite probe", "too many probes"])
async def test_the_destination_refuses_a_source_that_breaks_the_rules(
        frames: list[dict[str, Any]]) -> None:
    a, b = memory_stream_pair()

    async def source() -> None:
        for frame in frames:
            await launch.send_frame(a, frame)
            if "clock_probe" in frame and len(frames) > 1:
                await launch.receive_frame(a)

    task = asyncio.create_task(source())
    with pytest.raises(RemoteProtocolError):
        await report_exchange.serve_report(b, arrived_report())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
