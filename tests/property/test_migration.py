"""Property tests of the migrator: random writers on both sides, checked against a model.

For random device shapes, random concurrent writes at the source during pre-copy
and dirty cycles, and random reads and writes at the destination after the
hand-off (while post-copy still streams), the destination must:

* equal the source exactly as it was at the hand-off point, except for
* blocks the destination wrote itself after the hand-off, which survive, and
* never return, to any read after the hand-off, data older than the final
  dirty list (each read equals the model: frozen source + local writes).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.migration.channel import memory_channel_pair
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.policy import DirtyPolicy, Mode
from ferry.migration.source import MigrationHooks, Migrator
from ferry.migration.stacks import DestinationStack, destination_stack, source_stack
from ferry.protocol.messages import DeviceInfo
from ferry.storage.providers.memory import MemoryDevice

BS = 512


@dataclass(frozen=True)
class Scenario:
    sizes: list[int]
    seed: int
    source_writes: int
    dest_ops: int
    mode: Mode
    max_cycles: int
    concurrency: int


scenarios = st.builds(
    Scenario,
    sizes=st.lists(st.integers(1, 40 * BS), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    source_writes=st.integers(0, 200),
    dest_ops=st.integers(0, 60),
    mode=st.sampled_from([Mode.HYBRID, Mode.PRECOPY_ONLY, Mode.POSTCOPY]),
    max_cycles=st.integers(0, 4),
    concurrency=st.integers(1, 4),
)


async def run_scenario(sc: Scenario) -> None:
    sizes = sc.sizes
    rnd = random.Random(sc.seed)
    sources = [source_stack(f"d{i}", MemoryDevice(n), BS) for i, n in enumerate(sizes)]
    for s in sources:
        await s.local.write_at(0, rnd.randbytes(s.local.size_bytes))
    dests: list[DestinationStack] = []
    model: list[bytearray] = []
    stop = asyncio.Event()
    failures: list[str] = []

    async def source_writer() -> None:
        for _ in range(sc.source_writes):
            if stop.is_set():
                return
            s = rnd.choice(sources)
            off = rnd.randrange(s.local.size_bytes)
            n = rnd.randint(1, min(3 * BS, s.local.size_bytes - off))
            await s.local.write_at(off, rnd.randbytes(n))
            await asyncio.sleep(0)

    async def suspend() -> None:
        stop.set()
        for s in sources:
            model.append(bytearray(await s.remote.read_at(0, s.remote.size_bytes)))

    async def dest_ops() -> None:
        for _ in range(sc.dest_ops):
            i = rnd.randrange(len(dests))
            d = dests[i]
            size = d.local.size_bytes
            off = rnd.randrange(size)
            n = rnd.randint(1, min(2 * BS, size - off))
            if rnd.random() < 0.5:
                data = rnd.randbytes(n)
                await d.local.write_at(off, data)
                model[i][off : off + n] = data
            else:
                got = await d.local.read_at(off, n)
                if got != bytes(model[i][off : off + n]):
                    failures.append(f"stale read on {d.name} at {off}+{n}")
            await asyncio.sleep(0)

    async def open_devices(infos: Sequence[DeviceInfo]) -> list[DestinationDevice]:
        for info in infos:
            dests.append(
                destination_stack(info.name, MemoryDevice(info.size_bytes), info.block_size_bytes)
            )
        return [d.destination_device() for d in dests]

    ops: list[asyncio.Task[None]] = []

    async def on_handoff(payload: bytes) -> None:
        ops.append(asyncio.get_running_loop().create_task(dest_ops()))

    a, b = memory_channel_pair()
    policy = DirtyPolicy(
        max_dirty_blocks=2, min_cycles_below=2, max_cycles=sc.max_cycles, cycle_throttle_s=0
    )
    mode = sc.mode
    migrator = Migrator(
        [s.source_device() for s in sources],
        a,
        policy=policy,
        mode=mode,
        hooks=MigrationHooks(suspend=suspend),
        concurrency=sc.concurrency,
    )
    receiver = Receiver(b, open_devices, mode=mode, on_handoff=on_handoff)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(source_writer())
        tg.create_task(receiver.run())
        await migrator.run()
    await asyncio.gather(*ops)
    assert not failures, failures
    for i, d in enumerate(dests):
        assert await d.remote.read_at(0, d.remote.size_bytes) == bytes(model[i]), d.name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_destination_matches_source_at_handoff_plus_local_writes(sc: Scenario) -> None:
    asyncio.run(run_scenario(sc))
