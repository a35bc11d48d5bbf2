"""The watchers' I/O loop against the emulators on loopback (in-process, no namespace):
each provider's notice once, malformed answers survived, bodies bounded, tokens renewed."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from ferry.spot import Action, Notice, Provider, SpotError, detect, watcher_for
from ferry.spot.errors import (
    MetadataResponseError,
    MetadataUnreachableError,
    NoMetadataServiceError,
)
from ferry.spot.messages import Request
from ferry.spot.watch import Backoff, NoticeGate, SpotWatcher, client, core_for, exchange
from ferry.testing.metadata import MetadataEmulator

FAST_POLL_S = 0.05


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def emulated(*providers: Provider) -> AsyncIterator[tuple[MetadataEmulator, str]]:
    emulator = MetadataEmulator(providers or tuple(Provider))
    sock = listener()
    try:
        async with emulator.serving(sock):
            yield emulator, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


class Watching:
    """A watcher running in the background, its notices and errors collected."""

    def __init__(self, watcher: SpotWatcher) -> None:
        self.watcher = watcher
        self.notices: list[Notice] = []
        self.errors: list[SpotError] = []

    async def until(self, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():  # noqa: ASYNC110 (the emulator's counters have no event)
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def watching(watcher: SpotWatcher) -> AsyncIterator[Watching]:
    w = Watching(watcher)
    watcher.backoff = Backoff(0.01, 0.05, rng=random.Random(1))
    task = asyncio.create_task(watcher.run(w.notices.append, w.errors.append))
    try:
        yield w
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


NOTICE_PATHS = {Provider.AWS: "/latest/meta-data/spot/instance-action",
                Provider.GCP: "/computeMetadata/v1/instance/preempted",
                Provider.AZURE: "/metadata/scheduledevents"}


@pytest.mark.parametrize("provider", list(Provider))
async def test_a_notice_is_handed_on_once_and_malformed_answers_are_survived(
        provider: Provider) -> None:
    async with emulated(provider) as (emulator, url):
        watcher = await watcher_for("auto", base_url=url, poll_interval_s=FAST_POLL_S)
        assert watcher.provider is provider
        async with watching(watcher) as w:
            await w.until(lambda: emulator.asked(NOTICE_PATHS[provider]) >= 1)
            emulator.serve_raw(provider, 200, '{"Events": "garbage', times=3)
            await w.until(lambda: len(w.errors) >= 3)
            assert w.notices == []
            assert all(isinstance(e, MetadataResponseError) for e in w.errors)
            key = emulator.inject(provider)
            await w.until(lambda: len(w.notices) == 1)
            # Polls go on, and the same event is not handed on again. (GCP's hanging GET
            # returns on a change only: an error makes it start over with a plain GET.)
            asked = emulator.asked(NOTICE_PATHS[provider])
            if provider is Provider.GCP:
                emulator.serve_raw(provider, 500, "boom", times=1)
            await w.until(lambda: emulator.asked(NOTICE_PATHS[provider]) >= asked + 2)
            assert len(w.notices) == 1
            [notice] = w.notices
            assert notice.provider is provider
            assert key in notice.key
            assert 0 <= notice.seconds_left() <= 121


async def test_aws_token_renewed_after_401() -> None:
    async with emulated(Provider.AWS) as (emulator, url):
        watcher = await watcher_for(Provider.AWS, base_url=url, poll_interval_s=FAST_POLL_S)
        async with watching(watcher) as w:
            await w.until(lambda: emulator.asked(NOTICE_PATHS[Provider.AWS]) >= 2)
            assert emulator.asked("/latest/api/token", "PUT") == 1
            emulator.revoke_tokens()
            await w.until(lambda: emulator.asked("/latest/api/token", "PUT") == 2)
            emulator.inject(Provider.AWS, action="hibernate")
            await w.until(lambda: len(w.notices) == 1)
            assert w.notices[0].action == "hibernate"
            assert w.errors == []  # a 401 is part of the conversation, not an error


async def test_azure_other_vms_events_are_ignored_and_acknowledge_starts_ours() -> None:
    async with emulated(Provider.AZURE) as (emulator, url):
        watcher = await watcher_for(Provider.AZURE, base_url=url, poll_interval_s=FAST_POLL_S)
        async with watching(watcher) as w:
            emulator.inject(Provider.AZURE, resources=["someone-else"])
            emulator.inject(Provider.AZURE, action="Freeze")
            await w.until(lambda: emulator.asked(NOTICE_PATHS[Provider.AZURE]) >= 3)
            assert w.notices == []
            key = emulator.inject(Provider.AZURE, action="Terminate", in_s=300)
            await w.until(lambda: len(w.notices) == 1)
            assert w.notices[0].key == key
            await watcher.acknowledge(w.notices[0])
            assert emulator.acknowledged == [key]
            # Started now (NotBefore ""): the same event, not a new notice.
            asked = emulator.asked(NOTICE_PATHS[Provider.AZURE])
            await w.until(lambda: emulator.asked(NOTICE_PATHS[Provider.AZURE]) >= asked + 3)
            assert len(w.notices) == 1


async def test_a_storm_of_events_is_capped() -> None:
    async with emulated(Provider.AZURE) as (emulator, url):
        watcher = await watcher_for(Provider.AZURE, base_url=url, poll_interval_s=FAST_POLL_S)
        watcher.gate = NoticeGate(limit=4)
        async with watching(watcher) as w:
            for _ in range(40):
                emulator.inject(Provider.AZURE)
            await w.until(lambda: watcher.gate.refused >= 36)
            assert len(w.notices) == 4


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversized_bodies_are_refused_unread(chunked: bool) -> None:
    huge = b"x" * (8 << 20)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if chunked:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(64):
                writer.write(b"20000\r\n" + b"x" * 0x20000 + b"\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(huge) + huge)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, client(f"http://127.0.0.1:{port}") as http:
        request = Request("GET", "/metadata/scheduledevents", max_body_bytes=256 * 1024)
        with pytest.raises(MetadataResponseError, match=r"at most 262144|longer than 262144"):
            await exchange(http, request, Provider.AZURE)


async def test_broken_http_and_silence_are_typed_errors() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SPAM SPAM SPAM\r\n\r\n")
        await writer.drain()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    for handler, error in ((garbage, MetadataResponseError), (silent, MetadataUnreachableError)):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, client(f"http://127.0.0.1:{port}") as http:
            with pytest.raises(error):
                await exchange(http, Request("GET", "/", timeout_s=0.5), Provider.AWS)
        server.close()


async def test_auto_finds_nothing_where_nothing_answers() -> None:
    sock = listener()
    port = sock.getsockname()[1]
    sock.close()  # nobody listens there now
    with pytest.raises(NoMetadataServiceError, match="no metadata service"):
        await detect(f"http://127.0.0.1:{port}", timeout_s=1.0)


async def test_auto_refuses_to_guess_between_several() -> None:
    async with emulated(Provider.AWS, Provider.GCP) as (_, url):
        with pytest.raises(NoMetadataServiceError, match="several"):
            await detect(url)


def test_gate_admits_each_event_once_and_a_few_in_all() -> None:
    gate = NoticeGate(limit=2)
    now = dt.datetime.now(dt.UTC)
    a, b, c = (Notice(Provider.AWS, Action.TERMINATE, now, now, key=k) for k in "abc")
    gcp_a = Notice(Provider.GCP, Action.PREEMPT, now, now, key="a")
    assert [gate.admit(n) for n in (a, a, b, a, c, gcp_a)] == [True, False, True, False,
                                                                False, False]
    assert gate.refused == 2


def test_every_provider_has_a_core() -> None:
    assert [core_for(p).provider for p in Provider] == list(Provider)


def test_backoff_grows_to_its_cap_and_resets() -> None:
    b = Backoff(0.5, 5.0, rng=random.Random(0))
    delays = [b.next_s() for _ in range(10)]
    assert all(0.25 <= d <= 5.0 for d in delays)
    assert max(delays[6:]) > 2.5  # grown towards the cap
    b.reset()
    assert b.next_s() <= 0.5


async def test_the_control_api_injects_and_refuses_nonsense() -> None:
    import httpx

    from ferry.testing.metadata import control_app

    emulator = MetadataEmulator()
    transport = httpx.ASGITransport(app=control_app(emulator))
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as c:
        key = (await c.post("/inject/azure", json={"in_s": 45, "action": "Terminate"})).json()
        assert (await c.post("/inject/gcp")).status_code == 200
        assert (await c.post("/raw/aws", json={"status": 200, "body": "{"})).status_code == 200
        assert (await c.post("/inject/openstack")).status_code == 400
        assert (await c.post("/raw/aws", json={"body": "{"})).status_code == 400
        state = (await c.get("/state")).json()
    [event] = state["azure"]["Events"]
    assert event["EventId"] == key["key"]
    assert event["EventType"] == "Terminate"
    assert state["gcp"] == {"preempted": True}
    assert state["raw"] == ["aws"]
