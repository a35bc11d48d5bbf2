"""The daemon's spot watch: a notice is an event and a metric, then the evacuation hook,
then (Azure) the acknowledgement; a failed evacuation is reported and not acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from ferry.daemon.operations import Events
from ferry.daemon.spot import SpotWatch
from ferry.errors import FerryError
from ferry.spot import Notice, Provider
from ferry.testing.metadata import MetadataEmulator


@contextlib.asynccontextmanager
async def azure_emulator() -> AsyncIterator[tuple[MetadataEmulator, str]]:
    emulator = MetadataEmulator([Provider.AZURE])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    try:
        async with emulator.serving(sock):
            yield emulator, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


async def next_event(queue: asyncio.Queue[dict[str, Any] | None], kind: str) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            event = await queue.get()
            assert event is not None
            if event["kind"] == kind:
                return event


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def run_watch(watch: SpotWatch) -> AsyncIterator[None]:
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watch.run(tg))
        try:
            yield
        finally:
            task.cancel()


async def test_notice_event_metric_hook_then_acknowledge() -> None:
    events, registry = Events(), CollectorRegistry()
    evacuated: list[Notice] = []

    async def evacuate(notice: Notice) -> None:
        evacuated.append(notice)

    async with azure_emulator() as (emulator, url), events.subscribe() as queue:
        watch = SpotWatch("auto", events, registry, base_url=url, evacuate=evacuate)
        async with run_watch(watch):
            assert (await next_event(queue, "spot.watching"))["provider"] == "azure"
            key = emulator.inject(Provider.AZURE)
            event = await next_event(queue, "spot.notice")
            assert event["notice"]["key"] == key
            assert event["notice"]["provider"] == "azure"
            done = await next_event(queue, "spot.evacuation")
            assert done["state"] == "completed"
            assert [n.key for n in evacuated] == [key]
            assert sample(registry, "ferry_spot_notices_total", provider="azure",
                          action="preempt") == 1
            deadline = sample(registry, "ferry_spot_notice_deadline_seconds")
            assert deadline == evacuated[0].deadline.timestamp()
            async with asyncio.timeout(20):
                while emulator.acknowledged != [key]:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert watch.status()["notices"][0]["key"] == key


async def test_failed_evacuation_is_reported_and_not_acknowledged() -> None:
    events, registry = Events(), CollectorRegistry()

    async def evacuate(notice: Notice) -> None:
        raise FerryError("no node has room")

    async with azure_emulator() as (emulator, url), events.subscribe() as queue:
        watch = SpotWatch("azure", events, registry, base_url=url, evacuate=evacuate)
        async with run_watch(watch):
            emulator.serve_raw(Provider.AZURE, 200, b"[1, 2", times=1)
            emulator.inject(Provider.AZURE)
            done = await next_event(queue, "spot.evacuation")
            assert done["state"] == "failed"
            assert "no node has room" in done["error"]
            assert emulator.acknowledged == []
            assert sample(registry, "ferry_spot_watch_errors_total", provider="azure",
                          error="MetadataResponseError") == 1
