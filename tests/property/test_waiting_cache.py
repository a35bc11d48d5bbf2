"""Property: the waiting cache behaves like a simple model under random interleavings.

Hypothesis draws a sequence of operations: remote writes of whole blocks,
dirty lists (mark_absent), mark_present, local reads and local writes (which
may have to wait), and "serve" (the receiver answering every need). After
each operation the event loop runs until every task is blocked, and then:

* a local read or write is blocked exactly when the model says one of the
  blocks it must wait for is absent (all touched blocks for a read, the
  partly covered ones for a write);
* every blocked task is waiting for an absent block that ``on_need`` has
  reported in its current absence, so nothing can hang unnoticed;
* ``on_need`` is never called twice for a block within one absence;
* a finished read returned the model's bytes;
* presence and the locally written set match the model.

At the end every need is served and the device must equal the model.

The model is the inner device's expected contents plus two sets: present
blocks and locally written blocks. A remote write changes only blocks that
are not locally written; a local write always lands and makes its blocks
present and locally written; mark_absent spares locally written blocks.
At most one local write waits at a time, so the model knows its order.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.storage import MemoryDevice, WaitingLocal, WaitingRemote, waiting_cache

BS = 512
SIZE = 4 * BS + 200  # a short last block
BLOCKS = -(-SIZE // BS)


def touched(offset: int, length: int) -> list[int]:
    return list(range(offset // BS, (offset + length - 1) // BS + 1)) if length else []


def block_len(block: int) -> int:
    return min(BS, SIZE - block * BS)


def partial_blocks(offset: int, length: int) -> list[int]:
    out = []
    for b in touched(offset, length):
        start = b * BS
        if not (offset <= start and start + block_len(b) <= offset + length):
            out.append(b)
    return out


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@dataclass
class Harness:
    local: WaitingLocal
    remote: WaitingRemote
    content: bytearray = field(default_factory=lambda: bytearray(SIZE))
    present: set[int] = field(default_factory=set)
    written: set[int] = field(default_factory=set)
    reported: set[int] = field(default_factory=set)  # needs in the current absence
    reads: list[tuple[asyncio.Task[bytes], int, int]] = field(default_factory=list)
    write: tuple[asyncio.Task[None], int, bytes] | None = None

    def on_need(self, block: int) -> None:
        assert block not in self.reported, f"on_need({block}) twice in one absence"
        assert block not in self.present, f"on_need({block}) for a present block"
        self.reported.add(block)

    def becomes_present(self, block: int) -> None:
        self.present.add(block)
        self.reported.discard(block)

    # -- operations ---------------------------------------------------

    async def remote_write(self, first: int, count: int, seed: int) -> None:
        count = min(count, BLOCKS - first)
        start, end = first * BS, min(SIZE, (first + count) * BS)
        data = random.Random(seed).randbytes(end - start)
        await self.remote.write_at(start, data)
        for b in range(first, first + count):
            if b not in self.written:
                s = b * BS
                self.content[s : s + block_len(b)] = data[s - start : s - start + block_len(b)]
            self.becomes_present(b)

    async def serve(self) -> None:
        """Answer every reported need with fresh source data, as the receiver would."""
        for b in sorted(self.reported):
            await self.remote_write(b, 1, b * 7919)

    def mark_absent(self, blocks: list[int]) -> None:
        self.remote.mark_absent(blocks)
        self.present -= set(blocks) - self.written

    def mark_present(self, blocks: list[int]) -> None:
        self.remote.mark_present(blocks)
        for b in blocks:
            self.becomes_present(b)

    def start_read(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        self.reads.append((asyncio.create_task(self.local.read_at(offset, length)), offset, length))

    def start_write(self, offset: int, length: int, seed: int) -> None:
        if self.write is not None:
            return  # one waiting write at a time keeps the model's order exact
        length = min(length, SIZE - offset)
        data = random.Random(seed).randbytes(length)
        self.write = (asyncio.create_task(self.local.write_at(offset, data)), offset, data)

    # -- checks after the loop settles --------------------------------

    def check(self) -> None:
        before_write = bytes(self.content)
        if self.write is not None:
            write_task, offset, data = self.write
            blocked = any(b not in self.present for b in partial_blocks(offset, len(data)))
            assert write_task.done() != blocked, "write blocked state differs from the model"
            if blocked:
                self.assert_waits_on_reported(partial_blocks(offset, len(data)))
            else:
                write_task.result()
                self.content[offset : offset + len(data)] = data
                for b in touched(offset, len(data)):
                    self.written.add(b)
                    self.becomes_present(b)
                self.write = None
        after_write = bytes(self.content)
        still_waiting = []
        for task, offset, length in self.reads:
            blocked = any(b not in self.present for b in touched(offset, length))
            assert task.done() != blocked, "read blocked state differs from the model"
            if blocked:
                self.assert_waits_on_reported(touched(offset, length))
                still_waiting.append((task, offset, length))
            else:
                # A read woken together with a waiting write may run before or after it.
                assert task.result() in (
                    before_write[offset : offset + length],
                    after_write[offset : offset + length],
                )
        self.reads = still_waiting
        assert self.remote.missing() == sorted(set(range(BLOCKS)) - self.present)
        assert self.remote.present_count() == len(self.present)
        assert self.remote.locally_written() == self.written

    def assert_waits_on_reported(self, blocks: list[int]) -> None:
        absent = [b for b in blocks if b not in self.present]
        assert any(b in self.reported for b in absent), (
            f"a task waits for {absent} but none was reported to on_need"
        )


@dataclass(frozen=True)
class RemoteWrite:
    first: int
    count: int
    seed: int


@dataclass(frozen=True)
class MarkAbsent:
    blocks: list[int]


@dataclass(frozen=True)
class MarkPresent:
    blocks: list[int]


@dataclass(frozen=True)
class Read:
    offset: int
    length: int


@dataclass(frozen=True)
class Write:
    offset: int
    length: int
    seed: int


@dataclass(frozen=True)
class Serve:
    pass


Op = RemoteWrite | MarkAbsent | MarkPresent | Read | Write | Serve

block = st.integers(0, BLOCKS - 1)
blocks_list = st.lists(block, max_size=BLOCKS)
offset = st.integers(0, SIZE - 1)
length = st.integers(1, 3 * BS)
operation: st.SearchStrategy[Op] = st.one_of(
    st.builds(RemoteWrite, block, st.integers(1, 3), st.integers()),
    st.builds(MarkAbsent, blocks_list),
    st.builds(MarkPresent, blocks_list),
    st.builds(Read, offset, length),
    st.builds(Write, offset, length, st.integers()),
    st.builds(Serve),
)


async def apply(h: Harness, op: Op) -> None:
    match op:
        case RemoteWrite(first, count, seed):
            await h.remote_write(first, count, seed)
        case MarkAbsent(blocks):
            h.mark_absent(blocks)
        case MarkPresent(blocks):
            h.mark_present(blocks)
        case Read(offset, length):
            h.start_read(offset, length)
        case Write(offset, length, seed):
            h.start_write(offset, length, seed)
        case Serve():
            await h.serve()


async def scenario(ops: list[Op]) -> None:
    local, remote = waiting_cache(MemoryDevice(SIZE), BS)
    h = Harness(local, remote)
    remote.set_on_need(h.on_need)
    try:
        for op in ops:
            await apply(h, op)
            await settle()
            h.check()
        # Drain: serve until nothing waits, then everything must match the model.
        for _ in range(BLOCKS + 2):
            if not h.reads and h.write is None:
                break
            await h.serve()
            await settle()
            h.check()
        assert not h.reads
        assert h.write is None
        await h.remote.write_at(0, bytes(SIZE))  # zeros for every block not ours
        for b in range(BLOCKS):
            if b not in h.written:
                h.content[b * BS : b * BS + block_len(b)] = bytes(block_len(b))
        assert remote.missing() == []
        assert await local.read_at(0, SIZE) == h.content
        assert await remote.read_at(0, SIZE) == h.content
    finally:
        for task, _, _ in h.reads:
            task.cancel()
        if h.write is not None:
            h.write[0].cancel()
        await local.close()


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(operation, max_size=40))
def test_waiting_cache_matches_the_model(ops: list[Op]) -> None:
    asyncio.run(scenario(ops))
