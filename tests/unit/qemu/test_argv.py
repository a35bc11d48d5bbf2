from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.hostconfig import Accel
from ferry.qemu.argv import (
    AgentChannel,
    FileDisk,
    NbdDisk,
    PrivateRam,
    QemuConfig,
    SerialToFile,
    SerialToSocket,
    TapNet,
    UserNet,
    argv_for,
    host_tsc_khz,
    kernel_cmdline,
)
from ferry.shape import MachineShape

K, INITRD = Path("/k/vmlinuz"), Path("/k/initrd")
M64 = MachineShape(64)


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_plain_ram_tcg_defaults() -> None:
    argv = argv_for(K, INITRD, QemuConfig(machine=MachineShape(128), cmdline="console=ttyS0"))
    assert argv[0] == "qemu-system-x86_64"
    assert _pairs(argv, "-accel") == ["tcg"]
    assert _pairs(argv, "-cpu") == ["Nehalem-v1"]  # the portable default, whatever the accel
    assert _pairs(argv, "-smp") == ["1"]
    assert _pairs(argv, "-M") == ["microvm"]
    assert _pairs(argv, "-m") == ["128M"]
    assert _pairs(argv, "-kernel") == ["/k/vmlinuz"]
    assert _pairs(argv, "-initrd") == ["/k/initrd"]
    assert _pairs(argv, "-append") == ["console=ttyS0"]
    assert "-incoming" not in argv
    assert "-qmp" not in argv
    assert not any("memory-backend-file" in a for a in argv)


@pytest.mark.parametrize(("ram", "obj"), [
    (PrivateRam.ANONYMOUS, "memory-backend-ram,id=mem,size=256M"),
    (PrivateRam.MEMFD, "memory-backend-memfd,id=mem,size=256M,share=on"),
])
def test_private_ram_keeps_the_backend_name_a_migration_stream_carries(
        ram: PrivateRam, obj: str) -> None:
    argv = argv_for(K, INITRD, QemuConfig(machine=MachineShape(256), cmdline="",
                                          private_ram=ram))
    assert _pairs(argv, "-M") == ["microvm,memory-backend=mem"]
    assert _pairs(argv, "-object")[0] == obj


def test_memory_file_is_shared_backend() -> None:
    argv = argv_for(K, INITRD, QemuConfig(
        machine=MachineShape(256, vcpus=2, cpu_model="host"), cmdline="",
        memory_path=Path("/mnt/f/mem.bin"), accel=Accel.KVM, incoming="defer",
        qmp_socket=Path("/run/q.sock")))
    assert _pairs(argv, "-M") == ["microvm,memory-backend=mem"]
    assert ("memory-backend-file,id=mem,size=256M,mem-path=/mnt/f/mem.bin,share=on"
            in _pairs(argv, "-object"))
    assert _pairs(argv, "-accel") == ["kvm"]
    assert _pairs(argv, "-cpu") == ["host"]
    assert _pairs(argv, "-smp") == ["2"]
    assert _pairs(argv, "-m") == ["256M"]
    assert _pairs(argv, "-incoming") == ["defer"]
    assert _pairs(argv, "-qmp") == ["unix:/run/q.sock,server=on,wait=off"]


def test_disks_file_and_nbd_in_order() -> None:
    argv = argv_for(K, INITRD, QemuConfig(machine=M64, cmdline="", disks=(
        FileDisk(Path("/img/root.ext4")),
        NbdDisk(Path("/run/nbd.sock"), export="data", read_only=True),
    )))
    assert _pairs(argv, "-blockdev") == [
        "driver=file,node-name=disk0-file,filename=/img/root.ext4,read-only=off",
        "driver=raw,node-name=disk0,file=disk0-file,read-only=off",
        "driver=nbd,node-name=disk1,server.type=unix,server.path=/run/nbd.sock,"
        "export=data,read-only=on",
    ]
    devices = _pairs(argv, "-device")
    assert devices[:2] == ["virtio-blk-device,drive=disk0", "virtio-blk-device,drive=disk1"]


def test_commas_in_paths_are_escaped() -> None:
    argv = argv_for(K, INITRD, QemuConfig(machine=M64, cmdline="",
                                          disks=(FileDisk(Path("/a,b/d.img")),),
                                          serial=SerialToFile(Path("/l,og"))))
    assert "filename=/a,,b/d.img" in _pairs(argv, "-blockdev")[0]
    assert _pairs(argv, "-chardev") == ["file,id=serial0,path=/l,,og"]


def test_serial_socket_agent_and_nets() -> None:
    argv = argv_for(K, INITRD, QemuConfig(
        machine=M64, cmdline="", serial=SerialToSocket(Path("/run/console.sock")),
        agent=AgentChannel(Path("/run/agent.sock")),
        net=UserNet(host_forwards=((16379, 6379), (2222, 22)))))
    chardevs = _pairs(argv, "-chardev")
    assert "socket,id=serial0,path=/run/console.sock,server=on,wait=off" in chardevs
    assert "socket,id=agent0,path=/run/agent.sock,server=on,wait=off" in chardevs
    assert _pairs(argv, "-serial") == ["chardev:serial0"]
    devices = _pairs(argv, "-device")
    assert "virtio-serial-device,id=vser0" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent0,name=ferry.agent" in devices
    assert _pairs(argv, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:16379-:6379,hostfwd=tcp:127.0.0.1:2222-:22"]
    on_host = argv_for(K, INITRD, QemuConfig(
        machine=M64, cmdline="", net=UserNet(host_forwards=((16379, 6379),), bind="10.77.0.2")))
    assert _pairs(on_host, "-netdev") == ["user,id=net0,hostfwd=tcp:10.77.0.2:16379-:6379"]
    tap = argv_for(K, INITRD, QemuConfig(machine=M64, cmdline="", net=TapNet("tap7")))
    assert _pairs(tap, "-netdev") == ["tap,id=net0,ifname=tap7,script=no,downscript=no"]


def test_an_invalid_shape_never_reaches_a_command_line() -> None:
    with pytest.raises(ConfigError, match="memory_mib"):
        QemuConfig(machine=MachineShape(8), cmdline="")
    with pytest.raises(ConfigError, match="vcpus"):
        QemuConfig(machine=MachineShape(64, vcpus=0), cmdline="")


def test_host_tsc_khz_parses_cpuinfo() -> None:
    assert host_tsc_khz("processor\t: 0\ncpu MHz\t\t: 2596.138\n") == 2596138
    with pytest.raises(ConfigError):
        host_tsc_khz("processor: 0\n")
    assert host_tsc_khz() > 0


def test_kernel_cmdline() -> None:
    line = kernel_cmdline(tsc_khz=2596138, net=UserNet(), extra=["foo=1"]).split()
    assert line[:4] == ["console=ttyS0", "reboot=k", "panic=-1", "tsc_early_khz=2596138"]
    assert "ferry.root=/dev/vda" in line
    assert "ferry.ip=10.0.2.15/24" in line
    assert "ferry.gw=10.0.2.2" in line
    assert line[-1] == "foo=1"
    assert "ferry.root=none" in kernel_cmdline(tsc_khz=1, root=None, quiet=False).split()
