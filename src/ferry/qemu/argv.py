"""QEMU command lines for microvm guests, as a pure function.

:func:`argv_for` only builds a list of strings from a :class:`QemuConfig`; it starts
nothing, so the runtime and tests can inspect the exact command.
Every device is explicit (``-nodefaults``): virtio-mmio devices on
``-M microvm`` (its ACPI tables tell the guest where they are), guest RAM in
a shared file when migration needs to see it, disks as ``-blockdev`` nodes
backed by a file or an NBD export on a UNIX socket.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferry.errors import ConfigError
from ferry.hostconfig import Accel
from ferry.shape import MachineShape

QEMU_BINARY = "qemu-system-x86_64"

@dataclass(frozen=True, slots=True)
class FileDisk:
    """A raw disk image file, opened through QEMU's ``file`` driver."""

    path: Path
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class NbdDisk:
    """A disk served over NBD on a UNIX socket (QEMU's built-in NBD client)."""

    socket_path: Path
    export: str = ""
    read_only: bool = False


DiskSpec = FileDisk | NbdDisk


@dataclass(frozen=True, slots=True)
class SerialToFile:
    """Guest serial console appended to a host file."""

    path: Path


@dataclass(frozen=True, slots=True)
class SerialToSocket:
    """Guest serial console on a UNIX socket QEMU listens on (one client at a time).

    With ``log``, QEMU also appends everything the guest writes to that file,
    whether or not a client is connected; with none connected the guest's
    output is only logged (never held back).
    """

    path: Path
    log: Path | None = None


SerialSpec = SerialToFile | SerialToSocket


@dataclass(frozen=True, slots=True)
class AgentChannel:
    """A virtio-serial port named ``name`` backed by a UNIX socket QEMU listens on."""

    socket_path: Path
    name: str = "ferry.agent"


@dataclass(frozen=True, slots=True)
class UserNet:
    """QEMU user-mode networking (no privileges) with TCP port forwards.

    ``host_forwards`` holds ``(host_port, guest_port)`` pairs bound on
    ``bind`` (127.0.0.1 unless a host address is given). The guest is
    10.0.2.15/24 with gateway 10.0.2.2.
    """

    host_forwards: tuple[tuple[int, int], ...] = ()
    mac: str = "52:54:00:12:34:56"
    bind: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class TapNet:
    """A pre-created TAP interface."""

    ifname: str
    mac: str = "52:54:00:12:34:56"


NetSpec = UserNet | TapNet


class PrivateRam(enum.Enum):
    """Guest RAM that only QEMU holds (it arrives in QEMU's own migration stream)."""

    ANONYMOUS = "memory-backend-ram"
    """Process-private memory: the fastest to load a migration stream into."""
    MEMFD = "memory-backend-memfd"
    """A shared memfd (``share=on``): ``x-ignore-shared`` leaves it out of a device-state
    save, and the host can read it through ``/proc/PID/fd``."""

USER_NET_GUEST_IP = "10.0.2.15/24"
USER_NET_GATEWAY = "10.0.2.2"


@dataclass(frozen=True, slots=True)
class QemuConfig:
    """Everything :func:`argv_for` needs besides kernel and initramfs."""

    machine: MachineShape
    cmdline: str
    memory_path: Path | None = None
    private_ram: PrivateRam | None = None
    """Without ``memory_path``: guest RAM in a named QEMU backend (id ``mem``, the name a
    migration stream from a ``memory_path`` VM carries), or None for plain ``-m``."""
    disks: Sequence[DiskSpec] = ()
    serial: SerialSpec | None = None
    qmp_socket: Path | None = None
    accel: Accel = Accel.TCG
    incoming: str | None = None
    agent: AgentChannel | None = None
    net: NetSpec | None = None
    sandbox: str | None = None
    """``-sandbox`` value (QEMU's seccomp filter), e.g. ``on,spawn=deny``; None: none."""
    extra_args: Sequence[str] = field(default_factory=tuple)


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's option syntax, where ',' is written ',,'."""
    return str(value).replace(",", ",,")


def argv_for(kernel: Path, initramfs: Path, config: QemuConfig) -> list[str]:
    """The full argv (``argv[0]`` included) for a microvm guest described by ``config``."""
    shape = config.machine
    machine = "microvm"
    argv = [QEMU_BINARY, "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-accel", config.accel.value, "-cpu", shape.cpu_model,
            "-smp", str(shape.vcpus), "-m", f"{shape.memory_mib}M"]
    if config.memory_path is not None:
        argv += ["-object", f"memory-backend-file,id=mem,size={shape.memory_mib}M,"
                            f"mem-path={_opt(config.memory_path)},share=on"]
        machine += ",memory-backend=mem"
    elif config.private_ram is not None:
        shared = ",share=on" if config.private_ram is PrivateRam.MEMFD else ""
        argv += ["-object", f"{config.private_ram.value},id=mem,size={shape.memory_mib}M"
                            f"{shared}"]
        machine += ",memory-backend=mem"
    argv += ["-M", machine, "-kernel", str(kernel), "-initrd", str(initramfs),
             "-append", config.cmdline]

    for i, disk in enumerate(config.disks):
        node = f"disk{i}"
        ro = "on" if disk.read_only else "off"
        if isinstance(disk, FileDisk):
            argv += ["-blockdev", f"driver=file,node-name={node}-file,"
                                  f"filename={_opt(disk.path)},read-only={ro}",
                     "-blockdev", f"driver=raw,node-name={node},file={node}-file,read-only={ro}"]
        else:
            export = f",export={_opt(disk.export)}" if disk.export else ""
            argv += ["-blockdev", f"driver=nbd,node-name={node},server.type=unix,"
                                  f"server.path={_opt(disk.socket_path)}{export},read-only={ro}"]
        argv += ["-device", f"virtio-blk-device,drive={node}"]

    if isinstance(config.serial, SerialToFile):
        argv += ["-chardev", f"file,id=serial0,path={_opt(config.serial.path)}",
                 "-serial", "chardev:serial0"]
    elif isinstance(config.serial, SerialToSocket):
        log = config.serial.log
        logfile = "" if log is None else f",logfile={_opt(log)},logappend=on"
        argv += ["-chardev", f"socket,id=serial0,path={_opt(config.serial.path)},"
                             f"server=on,wait=off{logfile}",
                 "-serial", "chardev:serial0"]

    if config.agent is not None:
        argv += ["-device", "virtio-serial-device,id=vser0",
                 "-chardev", f"socket,id=agent0,path={_opt(config.agent.socket_path)},"
                             "server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=agent0,"
                            f"name={_opt(config.agent.name)}"]

    if isinstance(config.net, UserNet):
        bind = config.net.bind
        fwd = "".join(f",hostfwd=tcp:{bind}:{h}-:{g}" for h, g in config.net.host_forwards)
        argv += ["-netdev", f"user,id=net0{fwd}",
                 "-device", f"virtio-net-device,netdev=net0,mac={config.net.mac}"]
    elif isinstance(config.net, TapNet):
        argv += ["-netdev", f"tap,id=net0,ifname={_opt(config.net.ifname)},"
                            "script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=net0,mac={config.net.mac}"]

    # The guest's entropy pool is seeded from the host instead of waiting for jitter.
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom",
             "-device", "virtio-rng-device,rng=rng0"]

    if config.qmp_socket is not None:
        argv += ["-qmp", f"unix:{_opt(config.qmp_socket)},server=on,wait=off"]
    if config.incoming is not None:
        argv += ["-incoming", config.incoming]
    if config.sandbox is not None:
        argv += ["-sandbox", config.sandbox]
    argv += list(config.extra_args)
    return argv


def host_tsc_khz(cpuinfo: str | None = None) -> int:
    """The host TSC frequency in kHz, from the first ``cpu MHz`` of /proc/cpuinfo.

    The guest needs it as ``tsc_early_khz``: without it, calibration against
    the emulated PIT sometimes hangs under TCG.
    """
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            return round(float(value) * 1000)
    raise ConfigError("no 'cpu MHz' line in /proc/cpuinfo")


def kernel_cmdline(
    *, tsc_khz: int, quiet: bool = True, root: str | None = "/dev/vda",
    net: NetSpec | None = None, extra: Sequence[str] = (),
) -> str:
    """The guest kernel command line ferry's init understands.

    ``reboot=k panic=-1`` with QEMU's ``-no-reboot`` make a guest reboot or
    panic end the QEMU process instead of hanging.
    """
    args = ["console=ttyS0", "reboot=k", "panic=-1", f"tsc_early_khz={tsc_khz}"]
    if quiet:
        args.append("quiet")
    args.append(f"ferry.root={root or 'none'}")
    if isinstance(net, UserNet):
        args += [f"ferry.ip={USER_NET_GUEST_IP}", f"ferry.gw={USER_NET_GATEWAY}"]
    args += list(extra)
    return " ".join(args)
