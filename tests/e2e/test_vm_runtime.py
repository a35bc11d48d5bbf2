"""QemuVM end to end: real QEMU (TCG unless KVM works), guest RAM on ferry's
FUSE mount, the root disk on ferry's NBD export, device-state save/restore.

Images are built from blueprints written here (cached in the ferry cache).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from ferry.guest.files import MARKER_READY, MARKER_STAGE1
from ferry.guest.image import build_blueprint
from ferry.guest.image.blueprint import BuiltImage, parse_blueprint
from ferry.hostconfig import HostConfig
from ferry.qemu import QemuVM, VMConfig, VMExitedError, VMState, VMStateError
from ferry.qemu.qmp import QMPCommandError, QMPCommandNotFoundError
from ferry.storage import FileDevice, MemoryDevice

pytestmark = pytest.mark.e2e

# These tests call the library directly: they pass it the host configuration of the
# environment they run in (FERRY_CACHE_DIR, FERRY_ACCEL ...), as the CLI does.
HOST = HostConfig.from_environ(os.environ)

BOOT_DEADLINE_S = 120.0  # TCG on a shared 2-core machine
MIB = 1024 * 1024

COUNTER_BLUEPRINT = """
name = "counter"
memory_mib = 128
disk_size_mib = 16
[workload]
command = 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.2; done'
readiness = "true"
"""

TICK_RE = re.compile(rb"^tick (\d+)\r?$", re.MULTILINE)


def _image(tmp_path: Path, text: str) -> BuiltImage:
    return build_blueprint(parse_blueprint(text, base_dir=tmp_path), tmp_path,
                           cache_dir=HOST.cache_root)


async def _disk_device(img: BuiltImage) -> MemoryDevice:
    """The root disk as a ferry MemoryDevice: QEMU can only reach it through NBD."""
    data = img.rootfs.read_bytes()
    dev = MemoryDevice(len(data), name="root")
    await dev.write_at(0, data)
    return dev


def _debugfs_cat(image: Path, guest_path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {guest_path}", str(image)],
                          capture_output=True, text=True, check=True).stdout


def _state(vm: QemuVM) -> VMState:
    """The VM's state now (a call, so mypy does not carry narrowing across awaits)."""
    return vm.state


def _complete_ticks(data: bytes) -> list[int]:
    """Tick numbers on complete console lines (a line cut by a pause is ignored)."""
    complete = data[: data.rfind(b"\n") + 1]
    return [int(m.group(1)) for m in TICK_RE.finditer(complete)]


async def test_boot_with_ram_on_fuse_and_root_on_nbd(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    img = _image(tmp_path, f'name = "nbd-write"\nmemory_mib = 128\ndisk_size_mib = 16\n'
                           f'[workload]\ncommand = "echo {token} > /root/token && sync && '
                           f'touch /tmp/synced && sleep 1000"\n'
                           # Ready only once the token is synced to the disk: QEMU is
                           # stopped right after, and an unsynced write would be lost.
                           f'readiness = "test -e /tmp/synced"\n')
    disk = await _disk_device(img)
    memory = MemoryDevice(128 * MIB)
    async with QemuVM(VMConfig.from_image(img), work_dir=tmp_path / "vm", memory=memory,
                      disks={"root": disk}) as vm:
        await vm.start()
        assert _state(vm) is VMState.RUNNING
        await vm.wait_for_console(MARKER_READY, timeout_s=BOOT_DEADLINE_S)
        assert await vm.query_status() == "running"
        ram_reads = vm.mount.counters("memory").bytes_read
        flushed = await vm.flush_memory()
        await vm.stop()
        assert _state(vm) is VMState.STOPPED
    console = (tmp_path / "vm" / "console.1.log").read_text(errors="replace")
    assert "cannot mount" not in console  # it ran from the NBD root disk
    # Guest RAM really lives in the ferry device behind the mount.
    assert ram_reads > 0 or flushed.bytes_written > 0
    assert any(await memory.read_at(0, 128 * MIB))
    # The guest's write went through QEMU's NBD client into the ferry device.
    dumped = tmp_path / "dumped.ext4"
    dumped.write_bytes(await disk.read_at(0, disk.size_bytes))
    assert _debugfs_cat(dumped, "/root/token").strip() == token


async def test_save_device_state_and_restore_continues_the_guest(tmp_path: Path) -> None:
    img = _image(tmp_path, COUNTER_BLUEPRINT)
    disk = await _disk_device(img)
    config = VMConfig.from_image(img)
    state_dev = MemoryDevice(4 * MIB, name="devstate")
    async with FileDevice(tmp_path / "ram.img", size_bytes=128 * MIB, create=True,
                          name="ram") as memory:
        async with QemuVM(config, work_dir=tmp_path / "src", memory=memory,
                          disks={"root": disk}) as vm:
            await vm.start()
            await vm.wait_for_console("tick 5\r\n", timeout_s=BOOT_DEADLINE_S)
            stats = await vm.save_device_state(state_dev)
            assert _state(vm) is VMState.PAUSED
            assert await vm.query_status() == "postmigrate"
            assert 0 < stats.state_bytes < 16 * MIB  # no RAM in the stream
            before = _complete_ticks(vm.console_path.read_bytes())
            os.kill(vm.pid or 0, signal.SIGKILL)  # the source is gone for good
        assert before
        # A new mount (cold page cache) on the same RAM file, a new QEMU.
        async with QemuVM(config, work_dir=tmp_path / "dst", memory=memory,
                          disks={"root": disk}) as vm2:
            await vm2.start_incoming()
            assert _state(vm2) is VMState.INCOMING
            loaded = await vm2.load_device_state(state_dev)
            assert loaded.state_bytes == stats.state_bytes
            assert _state(vm2) is VMState.PAUSED
            await vm2.resume()
            assert await vm2.query_status() == "running"
            await vm2.wait_for_console(f"tick {before[-1] + 3}\r\n", timeout_s=BOOT_DEADLINE_S)
            after_text = vm2.console_path.read_bytes()
    after = _complete_ticks(after_text)
    assert MARKER_STAGE1.encode() not in after_text  # it did not boot again
    assert after
    # It continued where it stopped: the first new tick follows the last old one.
    assert before[-1] < after[0] <= before[-1] + 2
    assert after == list(range(after[0], after[0] + len(after)))


async def test_restore_in_the_same_context_from_a_file(tmp_path: Path) -> None:
    img = _image(tmp_path, COUNTER_BLUEPRINT)
    disk = await _disk_device(img)
    state = tmp_path / "state.bin"
    async with QemuVM(VMConfig.from_image(img), work_dir=tmp_path / "vm",
                      memory=MemoryDevice(128 * MIB), disks={"root": disk}) as vm:
        await vm.start()
        await vm.wait_for_console("tick 3\r\n", timeout_s=BOOT_DEADLINE_S)
        await vm.save_device_state(state)
        before = _complete_ticks(vm.console_path.read_bytes())
        await vm.stop()
        assert state.read_bytes()[:4] == b"QEVM"  # QEMU's migration stream magic
        await vm.start_incoming()
        await vm.load_device_state(state)
        await vm.resume()
        await vm.wait_for_console(f"tick {before[-1] + 2}\r\n", timeout_s=BOOT_DEADLINE_S)
        after = _complete_ticks(vm.console_path.read_bytes())
        assert vm.console_path.name == "console.2.log"
    assert before[-1] < after[0] <= before[-1] + 2


async def test_qmp_errors_are_typed(tmp_path: Path) -> None:
    img = _image(tmp_path, COUNTER_BLUEPRINT)
    async with QemuVM(VMConfig.from_image(img), work_dir=tmp_path / "vm",
                      memory=MemoryDevice(128 * MIB)) as vm:
        await vm.start_incoming()  # paused with -S: no guest CPU time spent
        with pytest.raises(QMPCommandNotFoundError) as err:
            await vm.qmp.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        with pytest.raises(QMPCommandError) as err2:
            await vm.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "no-such-capability", "state": True}]})
        assert err2.value.error_class == "GenericError"
        assert err2.value.desc
        assert await vm.query_status() == "inmigrate"  # still usable afterwards
        with pytest.raises(VMStateError):
            await vm.pause()  # not valid while waiting for incoming state


async def test_qemu_killed_externally_is_reported(tmp_path: Path) -> None:
    img = _image(tmp_path, COUNTER_BLUEPRINT)
    async with QemuVM(VMConfig.from_image(img), work_dir=tmp_path / "vm",
                      memory=MemoryDevice(128 * MIB)) as vm:
        await vm.start_incoming()
        pid = vm.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(VMExitedError) as err:
            await vm.query_status()
        assert err.value.returncode == -signal.SIGKILL
        assert _state(vm) is VMState.STOPPED
        with pytest.raises(VMExitedError):
            await vm.pause()
        # A stopped VM can be started again on the same mount.
        await vm.start_incoming()
        assert await vm.query_status() == "inmigrate"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
