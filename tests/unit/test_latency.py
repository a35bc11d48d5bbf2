"""The fault-latency recorder: exact quantiles of the samples, buckets that add up, bounded
memory, and the waiting cache records a read that waited and not one that did not."""

from __future__ import annotations

import asyncio

import pytest

from ferry import latency
from ferry.latency import BUCKETS_MS, LatencyRecorder
from ferry.storage import MemoryDevice, waiting_cache


def test_quantiles_buckets_and_merge() -> None:
    a, b = LatencyRecorder(), LatencyRecorder()
    for ms in (1, 2, 3, 4):
        a.observe(ms / 1e3)
    b.observe(0.1)  # 100 ms
    a.merge(b)
    assert a.count == 5
    assert a.max_ms == pytest.approx(100.0)
    assert a.quantile_ms(0.5) == pytest.approx(3.0)
    assert a.quantile_ms(1.0) == pytest.approx(100.0)
    assert sum(a.buckets) == 5
    assert a.buckets[BUCKETS_MS.index(100.0)] == 1  # le 100 ms
    f = a.figures()
    assert (f["faults"], f["fault_wait_ms_p50"]) == (5, 3.0)
    assert LatencyRecorder().figures()["fault_wait_ms_p50"] is None


def test_samples_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "KEEP_SAMPLES", 10)
    r = LatencyRecorder()
    for n in range(100):
        r.observe(n / 1e3)
    assert r.count == 100
    assert len(r._samples) == 10
    assert r.max_ms == pytest.approx(99.0)


async def test_the_waiting_cache_records_waits() -> None:
    local, remote = waiting_cache(MemoryDevice(2 * 4096), 4096)
    await remote.write_at(0, bytes(4096))  # block 0 present: no wait
    await local.read_at(0, 4096)
    assert local.stalls.count == 0
    reader = asyncio.create_task(local.read_at(4096, 4096))
    await asyncio.sleep(0.02)
    await remote.write_at(4096, b"x" * 4096)
    assert await reader == b"x" * 4096
    assert local.stalls.count == 1
    assert local.stalls.max_ms >= 10.0
