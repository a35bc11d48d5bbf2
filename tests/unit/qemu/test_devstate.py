"""Device-state framing, the socket helpers, config validation and state guards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.qemu import DeviceStateError, QemuVM, VMConfig, VMState, VMStateError, devstate
from ferry.shape import MachineShape
from ferry.storage import MemoryDevice

MIB = 1024 * 1024


async def test_device_roundtrip_is_framed() -> None:
    dev = MemoryDevice(MIB)
    payload = b"QEVM" + bytes(range(256)) * 100
    await devstate.store(dev, payload, vm="t")
    assert (await dev.read_at(0, 8)) == devstate.MAGIC
    assert await devstate.load(dev, vm="t") == payload


async def test_file_roundtrip_is_raw(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    await devstate.store(path, b"QEVMxyz", vm="t")
    assert path.read_bytes() == b"QEVMxyz"
    assert await devstate.load(path, vm="t") == b"QEVMxyz"


async def test_too_small_device_and_garbage_are_refused() -> None:
    with pytest.raises(DeviceStateError, match="cannot hold"):
        await devstate.store(MemoryDevice(100), b"x" * 100, vm="t")
    with pytest.raises(DeviceStateError, match="no device state"):
        await devstate.load(MemoryDevice(MIB), vm="t")
    dev = MemoryDevice(64)
    await dev.write_at(0, devstate.MAGIC + (10**9).to_bytes(8, "big"))
    with pytest.raises(DeviceStateError, match="invalid"):
        await devstate.load(dev, vm="t")


async def test_send_and_receive_over_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    payload = bytes(range(256)) * 4000
    async with devstate.receive_stream(sock, vm="t") as receiver:
        await devstate.send_stream(sock, payload, vm="t", timeout_s=5)
        assert await receiver.result(5) == payload
    assert not sock.exists()


async def test_send_times_out_without_a_listener(tmp_path: Path) -> None:
    with pytest.raises(DeviceStateError, match="within"):
        await devstate.send_stream(tmp_path / "none.sock", b"x", vm="t", timeout_s=0.1)


async def test_receive_times_out_without_a_sender(tmp_path: Path) -> None:
    async with devstate.receive_stream(tmp_path / "m.sock", vm="t") as receiver:
        with pytest.raises(DeviceStateError, match="did not end"):
            await receiver.result(0.1)
    await asyncio.sleep(0)


def _config(tmp_path: Path, **kw: object) -> VMConfig:
    return VMConfig(kernel=tmp_path / "k", initramfs=tmp_path / "i", machine=MachineShape(64),
                    **kw)  # type: ignore[arg-type]


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timeouts"):
        _config(tmp_path, qmp_timeout_s=0)
    with pytest.raises(ConfigError, match="timeouts"):
        _config(tmp_path, stop_timeout_s=-1)
    assert _config(tmp_path).memory_bytes == 64 * MIB  # the shape's own bounds: test_shape.py


def test_memory_device_must_match_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="memory device"):
        QemuVM(_config(tmp_path), work_dir=tmp_path, memory=MemoryDevice(MIB))


def test_long_work_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too long"):
        QemuVM(_config(tmp_path), work_dir=tmp_path / ("x" * 120),
               memory=MemoryDevice(64 * MIB))


async def test_methods_are_guarded_by_the_lifecycle_state(tmp_path: Path) -> None:
    vm = QemuVM(_config(tmp_path), work_dir=tmp_path, memory=MemoryDevice(64 * MIB))
    assert vm.state is VMState.CREATED
    for call in (vm.pause, vm.resume, vm.query_status):
        with pytest.raises(VMStateError, match="created"):
            await call()
    with pytest.raises(VMStateError):
        await vm.save_device_state(tmp_path / "s")
    with pytest.raises(VMStateError):
        await vm.load_device_state(b"")
    await vm.stop()  # nothing to stop: a no-op
    assert vm.state is VMState.CREATED
