"""The VM holder (ferry.node.holder) without QEMU: a fake QEMU whose crash is an event,
the real control socket and records. A stop is answered only after the run dir is gone;
QEMU's own exit ends the watch; a received VM (no state dir) cannot be suspended."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest

from ferry.live.outgoing import Movable
from ferry.node.control import ControlClient, RemoteOpError
from ferry.node.holder import Ending, HeldVM, holding
from ferry.node.record import HolderRecord, HolderState
from ferry.qemu import QemuVM
from ferry.qemu.errors import VMExitedError
from ferry.vm.registry import SUPERVISOR_RECORD, VMPaths, read_json
from ferry.vm.stopmode import StopMode


class FakeQemu:
    def __init__(self) -> None:
        self.crash = asyncio.Event()

    def disk_counters(self) -> dict[str, dict[str, int]]:
        return {"root": {"reads": 1, "read_bytes": 512, "writes": 0, "write_bytes": 0,
                         "flushes": 0}}

    async def wait_crashed(self) -> VMExitedError:
        await self.crash.wait()
        return VMExitedError("QEMU exited unexpectedly", vm="h1", returncode=-9,
                             stderr_tail="")


def held(qemu: FakeQemu, *, can_suspend: bool = False) -> HeldVM:
    return HeldVM(cast(QemuVM, qemu), None, cast(Movable, None), can_suspend=can_suspend,
                  counters=lambda: ({"reads": 7}, {"cpu_s": 0.25}))


def record(vm_id: str = "h1") -> HolderRecord:
    return HolderRecord.for_this_process(vm_id, HolderState.RUNNING, qemu_pid=4242)


async def test_stop_is_answered_after_the_run_dir_is_gone(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "run", tmp_path / "state")
    client = ControlClient(paths.control_socket("h1"), "h1")
    cleaned = asyncio.Event()
    async with holding(paths, record()) as holder:
        rec = read_json(paths.run_dir("h1") / SUPERVISOR_RECORD)
        assert rec is not None
        assert (rec["status"], rec["qemu_pid"]) == ("running", 4242)
        status = await client.status()
        assert status.state is HolderState.RUNNING
        stop = asyncio.create_task(client.stop())
        ending = await holder.watch(held(FakeQemu()))
        assert ending is Ending.DISCARD
        await asyncio.sleep(0.1)
        assert not stop.done()  # the VM's cleanup (QEMU, mount, network) comes first
        cleaned.set()
    assert cleaned.is_set()
    reply = await stop
    assert reply.mode is StopMode.DISCARD
    assert not paths.run_dir("h1").exists()


async def test_qemu_exiting_by_itself_ends_the_watch(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "run", tmp_path / "state")
    qemu = FakeQemu()
    async with holding(paths, record()) as holder:
        watch = asyncio.create_task(holder.watch(held(qemu)))
        await asyncio.sleep(0.05)
        assert not watch.done()
        qemu.crash.set()
        assert await asyncio.wait_for(watch, 5) is Ending.CRASHED


async def test_status_and_suspend_only_where_the_vm_can_be_kept(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "run", tmp_path / "state")
    client = ControlClient(paths.control_socket("h1"), "h1")
    async with holding(paths, record()) as holder:
        holder.vm = held(FakeQemu())
        status = await client.status()
        assert (status.vm_id, status.qemu_pid) == ("h1", 4242)
        assert (dict(status.memory_io), dict(status.qemu_usage)) == ({"reads": 7},
                                                                     {"cpu_s": 0.25})
        with pytest.raises(RemoteOpError, match="cannot be suspended") as info:
            await client.stop(StopMode.SUSPEND)
        assert info.value.kind == "VMLifecycleError"
        with pytest.raises(RemoteOpError, match="not running"):
            await client.exec(["true"])  # no agent
        holder.request_stop(Ending.DISCARD)


async def test_a_second_holder_of_one_id_is_refused(tmp_path: Path) -> None:
    from ferry.vm.errors import VMExistsError

    paths = VMPaths(tmp_path / "run", tmp_path / "state")
    async with holding(paths, record()):
        with pytest.raises(VMExistsError):
            async with holding(paths, record()):
                pass
        assert paths.control_socket("h1").exists()


async def test_stop_is_refused_while_the_vm_arrives(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "run", tmp_path / "state")
    client = ControlClient(paths.control_socket("h1"), "h1")
    arriving = HolderRecord.for_this_process("h1", HolderState.RECEIVING)
    async with holding(paths, arriving):
        assert (await client.status()).state is HolderState.RECEIVING
        with pytest.raises(RemoteOpError, match="still arriving"):
            await client.stop()
