"""VolatilityMonitor: write counts per block in a sliding window."""

from __future__ import annotations

from ferry.storage import MemoryDevice, VolatilityMonitor

BS = 4096


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_counts_within_the_window_and_forgets_old_writes() -> None:
    clock = FakeClock()
    vm = VolatilityMonitor(MemoryDevice(10 * BS), BS, window_s=5.0, clock=clock)
    await vm.write_at(0, b"a")
    await vm.write_at(BS - 1, b"ab")  # blocks 0 and 1
    clock.now += 3
    await vm.write_at(5 * BS, b"x" * (2 * BS))  # blocks 5 and 6
    await vm.write_at(5 * BS, b"y")
    assert vm.counts() == {0: 2, 1: 1, 5: 2, 6: 1}
    assert vm.volatility(0) == 2
    assert vm.volatility(9) == 0
    clock.now += 2.5  # the first two writes are now older than 5 s
    assert vm.counts() == {5: 2, 6: 1}
    assert vm.volatility(0) == 0
    clock.now += 10
    assert vm.counts() == {}
    assert await vm.read_at(5 * BS, 2) == b"yx"


async def test_least_volatile_first_is_a_stable_order() -> None:
    clock = FakeClock()
    vm = VolatilityMonitor(MemoryDevice(10 * BS), BS, clock=clock)
    for block, times in [(7, 3), (2, 1), (4, 1), (9, 2)]:
        for _ in range(times):
            await vm.write_at(block * BS, b"z")
    assert vm.least_volatile_first([9, 7, 4, 3, 2, 0]) == [0, 3, 2, 4, 9, 7]
    assert vm.least_volatile_first(iter(range(10))) == [0, 1, 3, 5, 6, 8, 2, 4, 9, 7]
