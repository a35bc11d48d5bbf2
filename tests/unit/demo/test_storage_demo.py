"""The storage demo (part of the README's main job) stays correct on small devices."""

from __future__ import annotations

import asyncio

import pytest

from ferry.demo import storage
from ferry.demo.storage import run_storage_demo
from ferry.errors import ConfigError
from ferry.migration.policy import DirtyPolicy
from ferry.transport.base import Stream


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


async def test_a_failed_handshake_leaves_no_accept_task_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(stream: Stream, token: str, *, timeout_s: float) -> None:
        raise ConfigError("no token for you")

    monkeypatch.setattr(storage, "present_token", refuse)
    with pytest.raises(ConfigError, match="no token"):
        await run_storage_demo(size_mib=(1, 1), write_rate_mib_s=1.0)
    assert asyncio.all_tasks() == {asyncio.current_task()}
