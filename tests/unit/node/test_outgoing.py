"""The migrate / migrate-cancel ops (ferry.node.outgoing.Outgoing) with a fake VM and a fake
migrate function: one migration at a time, cancel before the hand-off keeps the VM here,
cancel after it is refused, ``gone`` once the VM left."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from ferry.live.access import Access
from ferry.live.downtime import Downtime
from ferry.live.errors import LiveMigrationError
from ferry.live.outgoing import Movable, Moved
from ferry.live.progress import MigrationProgress
from ferry.live.source import LiveOptions
from ferry.live.summary import MigrationSummary
from ferry.migration.source import Progress
from ferry.migration.state import Phase
from ferry.node.control import MigrateCancelReply, MigrateReply, MigrateRequest
from ferry.node.history import MigrationHistory
from ferry.node.outgoing import Outgoing

REQUEST = MigrateRequest(to=("127.0.0.1", 7521), access=Access(insecure=True))


@dataclass
class FakeVM:
    """Stands in for a Movable: records whether the guest is paused on the source."""

    vm_id: str = "f1"
    paused: bool = False
    resumed: int = 0


@dataclass
class FakeMigration:
    """A migrate function that pauses the VM, waits to be told to hand off and to finish;
    cancelled before the hand-off it resumes the VM (as migrate_to_host does)."""

    disks: Progress = field(default_factory=Progress)
    ram_bytes: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    hand_off: asyncio.Event = field(default_factory=asyncio.Event)
    handed_off: asyncio.Event = field(default_factory=asyncio.Event)
    finish: asyncio.Event = field(default_factory=asyncio.Event)
    fail_after_hand_off: bool = False
    calls: int = 0

    async def __call__(self, m: Movable, host: str, port: int, *, access: Access,
                       options: LiveOptions,
                       on_handed_off: Callable[[], Awaitable[None]] | None,
                       progress: MigrationProgress | None) -> Moved:
        vm = cast(FakeVM, m)
        if progress is not None:  # as migrate_out does: the migrator's own progress
            progress.attach(self.disks, lambda: self.ram_bytes)
        self.calls += 1
        vm.paused = True
        self.started.set()
        try:
            await self.hand_off.wait()
        except asyncio.CancelledError:
            vm.paused = False
            vm.resumed += 1
            raise
        assert on_handed_off is not None
        await on_handed_off()
        self.handed_off.set()
        await self.finish.wait()
        if self.fail_after_hand_off:
            raise LiveMigrationError("post-copy link lost", vm=vm.vm_id, handed_off=True)
        summary = MigrationSummary(vm.vm_id, "completed", True,
                                   Downtime(None, None, None, {}, None))
        return Moved(summary, {"outcome": "completed"}, None)


def make(vm: FakeVM | None) -> tuple[Outgoing, FakeMigration, list[bool]]:
    fake = FakeMigration()
    changes: list[bool] = []
    out = Outgoing(lambda: cast(Movable, vm), migrate=fake, on_active=changes.append)
    return out, fake, changes


async def test_success_sets_gone_and_reports() -> None:
    out, fake, changes = make(FakeVM())
    assert out.progress() is None
    task = asyncio.create_task(out.migrate(REQUEST))
    await fake.started.wait()
    assert out.active
    assert not out.idle.is_set()
    fake.disks.phase, fake.disks.bytes_sent, fake.disks.cycle = Phase.DIRTY_CYCLES, 1000, 2
    fake.ram_bytes = 5000
    seen = out.progress()
    assert seen is not None
    assert (seen["phase"], seen["bytes_sent"], seen["cycles"]) == ("dirty-cycles", 6000, 2)
    fake.hand_off.set()
    fake.finish.set()
    reply = await task
    assert isinstance(reply, MigrateReply)
    assert reply.summary.outcome == "completed"
    assert out.gone
    assert not out.active
    assert out.progress() is None
    assert out.idle.is_set()
    assert changes == [True, False]
    with pytest.raises(LiveMigrationError, match="already running or done"):
        await out.migrate(REQUEST)  # the VM is gone: nothing left to move
    assert fake.calls == 1


async def test_a_second_migrate_while_one_runs_is_refused() -> None:
    out, fake, _ = make(FakeVM())
    first = asyncio.create_task(out.migrate(REQUEST))
    await fake.started.wait()
    with pytest.raises(LiveMigrationError, match="already running") as info:
        await out.migrate(REQUEST)
    assert info.value.handed_off is False
    assert fake.calls == 1
    fake.hand_off.set()
    fake.finish.set()
    await first


async def test_cancel_before_the_hand_off_keeps_the_vm_here() -> None:
    vm = FakeVM()
    out, fake, changes = make(vm)
    task = asyncio.create_task(out.migrate(REQUEST))
    await fake.started.wait()
    assert out.cancel() == MigrateCancelReply(True)
    with pytest.raises(LiveMigrationError, match="cancelled before the hand-off") as info:
        await task
    assert info.value.handed_off is False
    assert (vm.paused, vm.resumed) == (False, 1)
    assert not out.gone
    assert not out.active
    assert out.idle.is_set()
    assert changes == [True, False]
    # The VM stayed: it can be migrated again.
    fake.hand_off.set()
    fake.finish.set()
    assert isinstance(await out.migrate(REQUEST), MigrateReply)
    assert out.gone


async def test_cancel_after_the_hand_off_is_refused() -> None:
    vm = FakeVM()
    out, fake, _ = make(vm)
    task = asyncio.create_task(out.migrate(REQUEST))
    fake.hand_off.set()
    await fake.handed_off.wait()
    reply = out.cancel()
    assert reply.cancelled is False
    assert "handed off" in reply.reason
    assert out.active
    fake.finish.set()
    assert isinstance(await task, MigrateReply)
    assert vm.resumed == 0
    assert out.gone


async def test_failure_after_the_hand_off_still_means_gone() -> None:
    out, fake, _ = make(FakeVM())
    fake.fail_after_hand_off = True
    fake.hand_off.set()
    fake.finish.set()
    with pytest.raises(LiveMigrationError) as info:
        await out.migrate(REQUEST)
    assert info.value.handed_off is True
    assert out.gone


async def test_cancel_without_a_migration_and_migrate_without_a_vm() -> None:
    out, fake, _ = make(None)
    assert out.cancel() == MigrateCancelReply(False, "no migration running")
    with pytest.raises(LiveMigrationError, match="not running"):
        await out.migrate(REQUEST)
    assert fake.calls == 0
    assert not out.gone


async def test_a_timeout_before_the_hand_off_keeps_the_vm_here_and_is_recorded(
        tmp_path: Path) -> None:
    vm = FakeVM()
    fake = FakeMigration()
    history = MigrationHistory(tmp_path)
    out = Outgoing(lambda: cast(Movable, vm), migrate=fake, history=history)
    req = MigrateRequest(to=("127.0.0.1", 7521), access=Access(insecure=True),
                         timeout_s=0.05, max_mbit=100.0, migration_id="mig-00000000001")
    with pytest.raises(LiveMigrationError, match=r"timed out after 0\.05 s") as info:
        await out.migrate(req)
    assert info.value.handed_off is False
    assert (vm.paused, vm.resumed, out.gone) == (False, 1, False)
    [record] = history.records()
    assert (record.id, record.state, record.to) == ("mig-00000000001", "failed",
                                                     "127.0.0.1:7521")
    assert "timed out" in (record.error or "")


async def test_a_timeout_after_the_hand_off_lets_post_copy_finish() -> None:
    vm = FakeVM()
    out, fake, _ = make(vm)
    req = MigrateRequest(to=("127.0.0.1", 7521), access=Access(insecure=True), timeout_s=0.05)
    task = asyncio.create_task(out.migrate(req))
    fake.hand_off.set()
    await fake.handed_off.wait()
    await asyncio.sleep(0.1)  # past the timeout: post-copy is not cancelled
    fake.finish.set()
    assert isinstance(await task, MigrateReply)
    assert out.gone
