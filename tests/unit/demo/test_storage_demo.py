"""The storage demo (part of the README's main job) stays correct on small devices."""

from __future__ import annotations

from ferry.demo.storage import run_storage_demo
from ferry.migration.policy import DirtyPolicy


async def test_storage_demo_migrates_under_writes_and_verifies() -> None:
    result = await run_storage_demo(
        size_mib=(8, 4),
        write_rate_mib_s=40.0,
        policy=DirtyPolicy(max_dirty_blocks=4, min_cycles_below=2, max_cycles=4,
                           cycle_throttle_s=0.05),
    )
    assert result.identical
    assert result.receive.verified
    assert result.writes > 0
    assert result.report.cycles >= 1
    assert [d.name for d in result.report.devices] == ["memory", "disk"]
