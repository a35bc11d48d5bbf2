"""The page writer's bookkeeping (:class:`PageLedger`) and its I/O against a small
in-memory Redis (STRLEN, SETRANGE, GETRANGE, PING) that can drop a connection or lose
a page, as a faulty migration would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ferry.errors import ConfigError
from ferry.testing.workload import (
    PAGE_BYTES,
    VALUE_BYTES,
    PageLedger,
    PageWriter,
    RedisReplyError,
    page_value,
)

ZERO = bytes(VALUE_BYTES)


def test_values_name_their_page_and_sequence() -> None:
    assert page_value(0x1f, 0x2a) == b"000001f-0000002a"
    assert len(page_value(0xfffffff, 0xffffffff)) == VALUE_BYTES
    assert page_value(3, 1) != page_value(4, 1) != page_value(4, 2)


def test_the_last_acknowledged_write_is_what_a_page_must_hold() -> None:
    ledger = PageLedger(pages=4, seed=1)
    writes = ledger.plan(50)
    assert len(ledger.in_flight) == 50
    ledger.acknowledge(50)
    last: dict[int, bytes] = {}
    for page, value in writes:
        last[page] = value
    assert ledger.last == last
    assert ledger.acknowledged == 50
    memory = {p: ledger.expected(p) for p in range(4)}
    assert ledger.mismatches(memory.items()) == []
    # An older value of a page (a lost update) and another page's value are caught.
    page, value = writes[-1]
    older = next(v for p, v in reversed(writes[:-1]) if p == page)
    assert ledger.mismatches([(page, older)]) == [page]
    other = next(p for p in range(4) if p != page)
    assert ledger.mismatches([(other, value)]) == [other]


def test_untouched_pages_must_be_zero() -> None:
    ledger = PageLedger(pages=1000, seed=2)
    ledger.acknowledge(len(ledger.plan(3)))
    untouched = next(p for p in range(1000) if p not in ledger.last)
    assert ledger.expected(untouched) == ZERO
    assert ledger.mismatches([(untouched, ZERO)]) == []
    assert ledger.mismatches([(untouched, b"x" * VALUE_BYTES)]) == [untouched]


def test_a_write_in_flight_may_or_may_not_have_landed() -> None:
    ledger = PageLedger(pages=1, seed=3)
    ledger.acknowledge(len(ledger.plan(2)))
    (_, sent), = ledger.plan(1)  # sent, its reply lost with the connection
    acked = ledger.expected(0)
    assert ledger.mismatches([(0, acked)]) == []
    assert ledger.mismatches([(0, sent)]) == []
    assert ledger.mismatches([(0, ZERO)]) == [0]
    ledger.acknowledge()  # resent and acknowledged: now only it will do
    assert ledger.mismatches([(0, acked)]) == [0]
    with pytest.raises(ValueError, match="in flight"):
        ledger.acknowledge()


def test_the_same_seed_plans_the_same_pages() -> None:
    assert PageLedger(100, seed=7).plan(20) == PageLedger(100, seed=7).plan(20)


@pytest.mark.parametrize("size", [0, PAGE_BYTES + 1, 513 * 2**20])
def test_the_string_size_is_checked(size: int) -> None:
    with pytest.raises(ConfigError):
        PageWriter([("127.0.0.1", 1)], size_bytes=size, rate_per_s=1)


class FakeRedis:
    """Just enough of Redis for the page writer, on a TCP port of 127.0.0.1."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.setranges = 0
        self.drop_after: int | None = None  # close the connection after this many
        self.refuse_size_over: int | None = None
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while args := await _read_command(reader):
                name = args[0].upper()
                if name == b"PING":
                    writer.write(b"+PONG\r\n")
                elif name == b"STRLEN":
                    writer.write(b":%d\r\n" % len(self.data))
                elif name == b"SETRANGE":
                    offset, value = int(args[2]), args[3]
                    end = offset + len(value)
                    if self.refuse_size_over is not None and end > self.refuse_size_over:
                        writer.write(b"-OOM command not allowed\r\n")
                        continue
                    self.data.extend(bytes(max(0, end - len(self.data))))
                    self.data[offset:end] = value
                    self.setranges += 1
                    writer.write(b":%d\r\n" % len(self.data))
                    if self.drop_after is not None and self.setranges >= self.drop_after:
                        self.drop_after = None
                        writer.close()
                        return
                elif name == b"GETRANGE":
                    got = bytes(self.data[int(args[2]):int(args[3]) + 1])
                    writer.write(b"$%d\r\n%s\r\n" % (len(got), got))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _read_command(reader: asyncio.StreamReader) -> list[bytes]:
    header = await reader.readline()
    if not header:
        return []
    args = []
    for _ in range(int(header[1:])):
        size = int((await reader.readline())[1:])
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


@pytest.fixture
async def redis() -> AsyncIterator[FakeRedis]:
    fake = FakeRedis()
    fake.server = await asyncio.start_server(fake._serve, "127.0.0.1", 0)
    async with fake.server:
        yield fake


async def _write(writer: PageWriter, count: int) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(30):
            await writer.wait_acknowledged(count)
    finally:
        stop.set()
        await task


async def test_writes_survive_a_dropped_connection_and_every_page_checks(
        redis: FakeRedis) -> None:
    pages = 64
    redis.drop_after = 40  # mid-run, maybe mid-pipeline: in-flight writes are resent
    writer = PageWriter([("127.0.0.1", redis.port)], size_bytes=pages * PAGE_BYTES,
                        rate_per_s=5000)
    await _write(writer, 300)
    assert len(redis.data) == pages * PAGE_BYTES  # allocated by SETRANGE of the last byte
    assert writer.reconnects >= 1
    check = await writer.check()
    assert (check.pages_checked, check.mismatched) == (pages, ())
    assert check.pages_touched == len(writer.ledger.last) > 0
    assert writer.achieved_per_s > 0


async def test_a_lost_page_is_reported(redis: FakeRedis) -> None:
    writer = PageWriter([("127.0.0.1", redis.port)], size_bytes=16 * PAGE_BYTES,
                        rate_per_s=5000, seed=5)
    await _write(writer, 100)
    page = next(iter(writer.ledger.last))
    redis.data[page * PAGE_BYTES:page * PAGE_BYTES + VALUE_BYTES] = ZERO  # the update lost
    assert (await writer.check()).mismatched == (page,)


async def test_hop_done_reports_the_hop_and_checks_the_pages(redis: FakeRedis) -> None:
    writer = PageWriter([("127.0.0.1", redis.port)], size_bytes=8 * PAGE_BYTES,
                        rate_per_s=2000)
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(30):
            await writer.wait_acknowledged(10)
            writer.hop_started()
            await writer.wait_acknowledged(50)
            report = await writer.hop_done()
    finally:
        stop.set()
        await task
    assert report["page_writes_during"] >= 40
    assert report["pages_checked"] == 8
    assert report["pages_mismatched"] == 0
    assert report["page_writes_per_s_achieved"] > 0


async def test_a_string_redis_cannot_hold_is_an_error_not_a_retry(redis: FakeRedis) -> None:
    redis.refuse_size_over = 4 * PAGE_BYTES
    writer = PageWriter([("127.0.0.1", redis.port)], size_bytes=8 * PAGE_BYTES,
                        rate_per_s=100)
    with pytest.raises(RedisReplyError, match="OOM"):
        await writer.run(asyncio.Event())
