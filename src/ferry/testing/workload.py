"""Redis write loads that prove a migration loses nothing a client saw acknowledged.

:class:`RedisWriter` sends ``SET w:<n> <n>`` one at a time to the VM's
forwarded port, records every write Redis acknowledged, and measures the
longest gap between two acknowledgements (reconnects included). When a
connection breaks or a reply takes too long it reconnects, trying the
preferred address first, then the others: after a migration the client finds
the VM on its new host. :meth:`RedisWriter.lost` reads every acknowledged key
back. RESP is spoken directly (a few lines) to need no client library.

:class:`PageWriter` is the load that dirties guest RAM at a known rate: Redis
holds one big string (``SETRANGE big <size-1> x`` allocates and zeroes it),
and the writer rewrites random 4 KiB-aligned pages of it (``SETRANGE`` of a
16-byte value at a page's offset) at a steady rate, pipelined. Its
:class:`PageLedger` remembers the last value acknowledged on every page; after
a hop, :meth:`PageWriter.hop_done` reads every page of the string back
(``GETRANGE``, pipelined) and counts the pages that do not hold what was
acknowledged last (untouched ones must still be zero). Both follow the VM
from host to host. :class:`HopLoad` is what the hop drivers
(:mod:`ferry.testing.redis_hops`, :mod:`ferry.testing.qemu_native`) need of a
load beside their :class:`RedisWriter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferry.errors import ConfigError, FerryError
from ferry.net import socket_in_netns

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
REPLY_TIMEOUT_S = 5.0
MGET_BATCH = 500


def command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RedisReplyError(FerryError):
    """Redis answered a load's command with an error (``-OOM ...``, ``-ERR ...``): the
    load is misconfigured for the guest (a string too big for its RAM), not a migration
    fault, so it is not retried."""


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(targets: Sequence[tuple[str, int]], *, preferred: int = 0,
                  namespace: str | None = None) -> Streams:
    """A connection to the first of ``targets`` that answers PING, trying ``preferred``
    first and then the others in turn, until one does (the VM is somewhere)."""
    order = list(targets[preferred:]) + list(targets[:preferred])
    while True:
        for host, port in order:
            sock = await socket_in_netns(namespace)
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await asyncio.get_running_loop().sock_connect(sock, (host, port))
                reader, writer = await asyncio.open_connection(sock=sock)
                async with asyncio.timeout(REPLY_TIMEOUT_S):
                    writer.write(command("PING"))
                    if (await reader.readline()).strip() != b"+PONG":
                        raise ConnectionError("no PONG")
                return reader, writer
            except (OSError, TimeoutError, ConnectionError):
                # Once a transport owns the socket only it may close it: closing the
                # bare fd lets the next socket reuse the number under the transport.
                if writer is not None:
                    writer.close()
                else:
                    sock.close()
        await asyncio.sleep(0.01)


class RedisWriter:
    """Continuous SETs to ``targets`` (host, port) from inside ``namespace``."""

    def __init__(self, targets: Sequence[tuple[str, int]], *, namespace: str | None = None,
                 prefix: str = "w") -> None:
        self.targets = list(targets)
        self.namespace = namespace
        self.prefix = prefix
        self.preferred = 0
        self.acknowledged: list[int] = []
        self.acknowledged_unix_s: list[float] = []
        """When each write's +OK arrived (wall clock, beside :attr:`acknowledged`)."""
        self.max_stall_s = 0.0
        self.reconnects = 0
        self._last_ack: float | None = None
        self._acked = asyncio.Event()
        self._ended = False

    @property
    def acknowledged_count(self) -> int:
        return len(self.acknowledged)

    async def _connect(self) -> Streams:
        return await connect(self.targets, preferred=self.preferred, namespace=self.namespace)

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set."""
        n = len(self.acknowledged)
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        self._last_ack = time.monotonic()
        try:
            while not stop.is_set():
                if writer is None or reader is None:
                    reader, writer = await self._connect()
                key = f"{self.prefix}:{n}"
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT_S):
                        writer.write(command("SET", key, str(n)))
                        line = await reader.readline()
                except (OSError, TimeoutError):
                    line = b""
                if line.strip() != b"+OK":
                    writer.close()
                    reader = writer = None
                    self.reconnects += 1
                    continue  # retry the same key: SET is idempotent
                now = time.monotonic()
                self.max_stall_s = max(self.max_stall_s, now - self._last_ack)
                self._last_ack = now
                self.acknowledged.append(n)
                self.acknowledged_unix_s.append(time.time())
                self._acked.set()
                n += 1
        finally:
            self._ended = True
            self._acked.set()  # waiters learn that no more writes come
            if writer is not None:
                writer.close()

    async def wait_acknowledged(self, count: int) -> None:
        """Wait until at least ``count`` writes were acknowledged (:class:`FerryError`
        if the writer stops first)."""
        while len(self.acknowledged) < count:
            if self._ended:
                raise FerryError(f"the writer stopped after {len(self.acknowledged)} "
                                 f"writes, short of {count}")
            self._acked.clear()
            await self._acked.wait()

    def acknowledged_before(self, unix_s: float) -> list[int]:
        """The writes whose +OK arrived before ``unix_s`` (wall clock)."""
        return [n for n, t in zip(self.acknowledged, self.acknowledged_unix_s, strict=True)
                if t < unix_s]

    async def lost(self, writes: Sequence[int] | None = None) -> list[int]:
        """Acknowledged writes (or these ``writes``) that cannot be read back (should be
        none)."""
        reader, writer = await self._connect()
        missing: list[int] = []
        wanted = self.acknowledged if writes is None else list(writes)
        try:
            for start in range(0, len(wanted), MGET_BATCH):
                batch = wanted[start:start + MGET_BATCH]
                writer.write(command("MGET", *(f"{self.prefix}:{i}" for i in batch)))
                header = await reader.readline()
                if not header.startswith(b"*"):
                    raise ConnectionError(f"unexpected MGET reply {header!r}")
                for i in batch:
                    size = int((await reader.readline())[1:])
                    value = None
                    if size >= 0:
                        value = (await reader.readexactly(size + 2))[:-2]
                    if value != str(i).encode():
                        missing.append(i)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return missing


class Load(Protocol):
    """A client load that follows the VM: :meth:`run` until ``stop``, trying the target
    :attr:`preferred` first when it reconnects."""

    preferred: int

    @property
    def acknowledged_count(self) -> int: ...

    async def run(self, stop: asyncio.Event) -> None: ...

    async def wait_acknowledged(self, count: int) -> None: ...


class HopLoad(Load, Protocol):
    """A load that runs beside a route's :class:`RedisWriter` while the VM hops.

    The hop driver starts :meth:`run` once the VM runs, waits for
    :meth:`wait_acknowledged` before the first hop, calls :meth:`hop_started` right
    before each hop and :meth:`hop_done` right after it (what it returns goes into
    that hop's record), and sets :attr:`preferred` to the new host's index in the
    targets once the VM is there."""

    def hop_started(self) -> None: ...

    async def hop_done(self) -> dict[str, Any]: ...


PAGE_BYTES = 4096
"""The guest's page size: one write dirties one guest page (the string's pages are
page-aligned up to Redis's small header; see :class:`PageWriter`)."""
VALUE_BYTES = 16
"""``<page:07x>-<sequence:08x>``: a page holding another page's value, or an older value
of its own, is told apart from the right one."""
MAX_STRING_BYTES = 512 * 2**20
"""Redis's largest string (``proto-max-bulk-len``)."""
MAX_DEBT_S = 0.25
"""Writes fall due at the rate; when the writer falls further behind than this (the VM
paused for a hand-off, a slow reply), the older debt is dropped, not sent as a burst:
the load stays a steady rate rather than a catch-up."""
TICK_S = 0.01
CHECK_BATCH = 1000
ALLOCATE_TIMEOUT_S = 120.0  # zeroing hundreds of MiB in a TCG guest


def page_value(page: int, sequence: int) -> bytes:
    """What write ``sequence`` puts at the start of ``page`` (:data:`VALUE_BYTES`)."""
    return b"%07x-%08x" % (page % 0x10000000, sequence % 0x100000000)


@dataclass(slots=True)
class PageLedger:
    """The page writer's bookkeeping, no I/O: which writes are due, which are in flight,
    and the last value acknowledged on every page.

    Writes are acknowledged in the order they were sent (one connection, pipelined),
    so the latest acknowledged write of a page is what the page must hold. A write
    sent but not acknowledged when a connection breaks stays in flight and is sent
    again first (``SETRANGE`` of the same value at the same offset is idempotent):
    the ledger never has to guess whether the old host applied it.
    """

    pages: int
    seed: int = 0
    sequence: int = 0
    last: dict[int, bytes] = field(default_factory=dict)
    in_flight: deque[tuple[int, bytes]] = field(default_factory=deque)
    acknowledged: int = 0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.pages < 1:
            raise ConfigError("a page ledger needs at least one page")
        self._rng = random.Random(self.seed)

    def plan(self, count: int) -> list[tuple[int, bytes]]:
        """``count`` new writes to uniformly random pages, added to :attr:`in_flight`."""
        writes = []
        for _ in range(count):
            page = self._rng.randrange(self.pages)
            writes.append((page, page_value(page, self.sequence)))
            self.sequence += 1
        self.in_flight.extend(writes)
        return writes

    def acknowledge(self, count: int = 1) -> None:
        """The oldest ``count`` writes in flight were acknowledged."""
        if count > len(self.in_flight):
            raise ValueError(f"{count} acknowledgements for {len(self.in_flight)} writes "
                             "in flight")
        for _ in range(count):
            page, value = self.in_flight.popleft()
            self.last[page] = value
        self.acknowledged += count

    def expected(self, page: int) -> bytes:
        """What ``page`` must hold: its last acknowledged value, else zeros (the string
        was allocated zeroed). A page with a write in flight may hold either."""
        return self.last.get(page, bytes(VALUE_BYTES))

    def mismatches(self, readback: Iterable[tuple[int, bytes]]) -> list[int]:
        """The pages of ``readback`` (page, first :data:`VALUE_BYTES`) that do not hold
        :meth:`expected` (nor, while a write to them is in flight, that write's value)."""
        pending: dict[int, set[bytes]] = {}
        for page, value in self.in_flight:
            pending.setdefault(page, set()).add(value)
        return [page for page, got in readback
                if got != self.expected(page) and got not in pending.get(page, ())]


@dataclass(frozen=True, slots=True)
class PageCheck:
    """One read-back of every page of the string."""

    pages_checked: int
    pages_touched: int
    mismatched: tuple[int, ...]
    check_s: float


class PageWriter:
    """Rewrites random pages of one big Redis string at ``rate_per_s`` from ``namespace``.

    :meth:`run` allocates the string (``size_bytes``, zeroed) unless it exists, then
    sends the writes that fell due every :data:`TICK_S` as one pipeline and reads
    their replies before the next (one batch in flight). It reconnects like
    :class:`RedisWriter` and resends what was in flight first. :meth:`check` pauses
    it between two batches and reads every page back. Values start at the string's
    byte ``page * PAGE_BYTES``; Redis keeps the string in one allocation behind a
    header of a few bytes, so each write lands in one guest page (two at most).
    """

    def __init__(self, targets: Sequence[tuple[str, int]], *, size_bytes: int,
                 rate_per_s: float, namespace: str | None = None, key: str = "big",
                 seed: int = 0) -> None:
        if not PAGE_BYTES <= size_bytes <= MAX_STRING_BYTES or size_bytes % PAGE_BYTES:
            raise ConfigError(f"the page string must be a multiple of {PAGE_BYTES} bytes, "
                              f"at most {MAX_STRING_BYTES} (Redis's limit), got {size_bytes}")
        if not rate_per_s > 0:
            raise ConfigError(f"the page write rate must be > 0, got {rate_per_s}")
        self.targets = list(targets)
        self.namespace = namespace
        self.key = key
        self.size_bytes = size_bytes
        self.rate_per_s = rate_per_s
        self.ledger = PageLedger(size_bytes // PAGE_BYTES, seed)
        self.preferred = 0
        self.max_stall_s = 0.0
        self.reconnects = 0
        self.skipped = 0
        """Writes that fell due but were dropped as debt older than :data:`MAX_DEBT_S`."""
        self.checks: list[PageCheck] = []
        self._pause = asyncio.Lock()
        self._acked = asyncio.Event()
        self._hop: tuple[float, int] | None = None
        self._started: float | None = None
        self._stopped: float | None = None
        self._paused_s = 0.0

    @property
    def acknowledged_count(self) -> int:
        return self.ledger.acknowledged

    @property
    def achieved_per_s(self) -> float:
        """Acknowledged writes per second of writing (checks excluded)."""
        return self.ledger.acknowledged / self.writing_s if self.writing_s > 0 else 0.0

    async def _connect(self) -> Streams:
        return await connect(self.targets, preferred=self.preferred, namespace=self.namespace)

    async def _allocate(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(command("STRLEN", self.key))
        length = await _integer(reader)
        if length == self.size_bytes:
            return
        if length:
            raise ConfigError(f"Redis key {self.key!r} holds {length} bytes, not "
                              f"{self.size_bytes}")
        writer.write(command("SETRANGE", self.key, str(self.size_bytes - 1), "x"))
        async with asyncio.timeout(ALLOCATE_TIMEOUT_S):
            await _integer(reader)

    @property
    def writing_s(self) -> float:
        """How long the write loop has run, pauses for :meth:`check` excluded."""
        if self._started is None:
            return 0.0
        return (self._stopped or time.monotonic()) - self._started - self._paused_s

    async def run(self, stop: asyncio.Event) -> None:
        """Allocate the string, then write until ``stop`` is set."""
        reader, writer = await self._connect()
        try:
            await self._allocate(reader, writer)
            self._started = last_ack = time.monotonic()
            planned = 0
            paused_s = 0.0
            while not stop.is_set():
                async with self._pause:
                    now = time.monotonic()
                    if paused_s != self._paused_s:  # a check paused the writes
                        paused_s, last_ack = self._paused_s, now
                    if not self.ledger.in_flight:
                        due = int(self.writing_s * self.rate_per_s) - planned
                        debt = int(MAX_DEBT_S * self.rate_per_s)
                        if due > debt:
                            self.skipped += due - debt
                            planned += due - debt
                            due = debt
                        if due > 0:
                            self.ledger.plan(due)
                            planned += due
                    if self.ledger.in_flight:
                        try:
                            await self._send(reader, writer)
                        except (OSError, TimeoutError, ConnectionError,
                                asyncio.IncompleteReadError):
                            writer.close()
                            self.reconnects += 1
                            reader, writer = await self._connect()
                            continue  # what is still in flight goes first
                        now = time.monotonic()
                        self.max_stall_s = max(self.max_stall_s, now - last_ack)
                        last_ack = now
                await asyncio.sleep(TICK_S)
        finally:
            self._stopped = time.monotonic()
            self._acked.set()  # waiters learn that no more writes come
            writer.close()

    async def _send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        batch = list(self.ledger.in_flight)
        writer.write(b"".join(command("SETRANGE", self.key, str(page * PAGE_BYTES),
                                      value.decode()) for page, value in batch))
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            for _ in batch:
                await _integer(reader)
                self.ledger.acknowledge()
                self._acked.set()

    async def wait_acknowledged(self, count: int) -> None:
        """Wait until at least ``count`` writes were acknowledged (:class:`FerryError`
        if the writer stops first)."""
        while self.ledger.acknowledged < count:
            if self._stopped is not None:
                raise FerryError(f"the page writer stopped after {self.ledger.acknowledged} "
                                 f"writes, short of {count}")
            self._acked.clear()
            await self._acked.wait()

    async def check(self) -> PageCheck:
        """Pause writing, read every page back, resume; mismatched pages in the result
        (and in :attr:`checks`)."""
        async with self._pause:
            started = time.monotonic()
            reader, writer = await self._connect()
            readback: list[tuple[int, bytes]] = []
            try:
                for first in range(0, self.ledger.pages, CHECK_BATCH):
                    pages = range(first, min(self.ledger.pages, first + CHECK_BATCH))
                    writer.write(b"".join(
                        command("GETRANGE", self.key, str(p * PAGE_BYTES),
                                str(p * PAGE_BYTES + VALUE_BYTES - 1)) for p in pages))
                    async with asyncio.timeout(REPLY_TIMEOUT_S):
                        readback += [(p, await _bulk(reader)) for p in pages]
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            ended = time.monotonic()
            if self._started is not None and self._stopped is None:
                self._paused_s += ended - started
            result = PageCheck(len(readback), len(self.ledger.last),
                               tuple(self.ledger.mismatches(readback)),
                               round(ended - started, 3))
        self.checks.append(result)
        return result

    def hop_started(self) -> None:
        self._hop = (self.writing_s, self.ledger.acknowledged)

    async def hop_done(self) -> dict[str, Any]:
        """The rate the hop ran under, then a read-back of every page on the new host."""
        assert self._hop is not None, "hop_done without hop_started"
        writing_s, acknowledged = self._hop
        took_s = self.writing_s - writing_s
        written = self.ledger.acknowledged - acknowledged
        # The VM is on the new host: writes reach it before the pages are read there.
        await self.wait_acknowledged(self.ledger.acknowledged + 1)
        check = await self.check()
        return {"page_writes_per_s_achieved": round(written / took_s, 1) if took_s else None,
                "page_writes_during": written,
                "pages_checked": check.pages_checked, "pages_touched": check.pages_touched,
                "pages_mismatched": len(check.mismatched), "page_check_s": check.check_s}


async def _integer(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    if line.startswith(b":"):
        return int(line[1:])
    if line.startswith(b"-"):
        raise RedisReplyError(f"Redis: {line[1:].strip().decode(errors='replace')}")
    raise ConnectionError(f"unexpected reply {line[:80]!r}")


async def _bulk(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    if line.startswith(b"$"):
        size = int(line[1:])
        return b"" if size < 0 else (await reader.readexactly(size + 2))[:-2]
    if line.startswith(b"-"):
        raise RedisReplyError(f"Redis: {line[1:].strip().decode(errors='replace')}")
    raise ConnectionError(f"unexpected reply {line[:80]!r}")


async def start_loads(loads: Sequence[Load], stop: asyncio.Event,
                      tasks: list[asyncio.Task[None]], *, writes_between: int,
                      timeout_s: float) -> None:
    """Start each load's task (appended to ``tasks``, for :func:`end_loads`) and wait for
    its first ``writes_between`` writes before the next: one that sets up (a page writer
    zeroing its string blocks Redis for seconds) does so before a later one's stall clock
    starts, so the plain writer goes last."""
    for load in loads:
        tasks.append(asyncio.create_task(load.run(stop)))
        async with asyncio.timeout(timeout_s):
            await load.wait_acknowledged(writes_between)


async def end_loads(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for every load's task to end; the first one's failure, if any, is raised."""
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
