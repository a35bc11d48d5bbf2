"""Boot a blueprint and snapshot it into a package directory.

::

    report = await snapshot("redis", Path("redis-pkg"), prepare=["redis-cli set k v"],
                            host=HostConfig.from_environ(os.environ))
    # redis-pkg/ now holds memory, state.bin, disks/root.img, boot/*, hashes/*, manifest.json

Steps: build the image (cached), create a VM network (namespace + tap, so the
guest's virtio-net device exists and is configured with the fixed guest
address; the resumed QEMU must have exactly the same device set), boot with
RAM on ferry's FUSE mount over ``memory`` and the root disk on ferry's NBD
export over ``disks/root.img``, wait for the agent's HELLO and the
blueprint's readiness command (run through the agent), run the ``prepare``
commands, the agent's before-suspend hooks, pause, flush guest RAM into the
memory file and save the device state only. Then copy kernel and initramfs,
hash every block and write the manifest. :func:`booted` is the same boot
without the snapshot (cold-boot benchmarks use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError
from ferry.guest.agent import AgentClient, AgentError, connect_agent
from ferry.guest.image import Blueprint, BuiltImage, build_blueprint, load_blueprint
from ferry.hostconfig import Accel, HostConfig
from ferry.net import PortForward, VMNetwork
from ferry.qemu import DeviceStateStats, QemuVM, VMConfig
from ferry.qemu.accel import host_accel
from ferry.qemu.argv import TapNet
from ferry.shape import DEFAULT_CPU_MODEL
from ferry.storage import FileDevice
from ferry.storage.hashing import block_hash
from ferry.vm.errors import SnapshotError
from ferry.vm.manifest import (
    INITRAMFS_PATH,
    KERNEL_PATH,
    MEMORY_PATH,
    STATE_PATH,
    AgentSettings,
    DeviceEntry,
    GuestNetwork,
    MachineSpec,
    VMManifest,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
BLOCK_SIZE_BYTES = 64 * 1024
"""Block size of the manifest's hashes and of the runner's overlays (the engine's default)."""
ROOT_DISK = "root"
READINESS_POLL_S = 0.2

Progress = Callable[[str], None]
OnReady = Callable[[AgentClient], Awaitable[None]]
ImageFor = Callable[[Path], BuiltImage]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class SnapshotReport:
    """What :func:`snapshot` made and how long each part took."""

    package_dir: Path
    manifest: VMManifest
    build_s: float
    boot_to_agent_s: float
    ready_s: float
    device_state: DeviceStateStats
    total_s: float


@dataclass(slots=True)
class Booted:
    """A blueprint booted by :func:`booted`, ready for its workload."""

    image: BuiltImage
    vm: QemuVM
    net: VMNetwork
    agent: AgentClient
    config: VMConfig
    boot_to_agent_s: float = 0.0
    ready_s: float = 0.0


MAX_EXTRA_DISKS = 15
"""With the root disk, the manifest's bound of 16 (:mod:`ferry.live.launch`)."""
MAX_EXTRA_DISK_MIB = 1 << 20
_DISK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def check_extra_disks(disks: Sequence[tuple[str, int]]) -> None:
    """Names ``[a-z0-9-]`` (1..32, not ``root``, distinct), sizes 1..1048576 MiB, at most
    :data:`MAX_EXTRA_DISKS`; else :class:`ConfigError`."""
    if len(disks) > MAX_EXTRA_DISKS:
        raise ConfigError(f"at most {MAX_EXTRA_DISKS} extra disks")
    names = [n for n, _ in disks]
    for name, mib in disks:
        if not _DISK_NAME_RE.match(name) or name == ROOT_DISK or names.count(name) > 1:
            raise ConfigError(f"disk name {name!r:.40}: [a-z0-9-], 1..32, distinct, not "
                              f"{ROOT_DISK!r}")
        if type(mib) is not int or not 1 <= mib <= MAX_EXTRA_DISK_MIB:
            raise ConfigError(f"disk {name}: size must be 1..{MAX_EXTRA_DISK_MIB} MiB")


def short_id() -> str:
    return secrets.token_hex(3)


@contextlib.asynccontextmanager
async def booted(
    blueprint: Blueprint | str | Path,
    memory: FileDevice,
    disk: FileDevice,
    *,
    work_dir: Path,
    forwards: Sequence[PortForward] = (),
    host: HostConfig,
    cpu_model: str = DEFAULT_CPU_MODEL,
    image: BuiltImage | None = None,
    boot_timeout_s: float = 180.0,
    ready_timeout_s: float = 180.0,
    progress: Progress = _quiet,
    extra_disks: Mapping[str, FileDevice] | None = None,
) -> AsyncIterator[Booted]:
    """Cold-boot a blueprint on ``memory``/``disk`` in its own network namespace.

    ``host`` gives the image cache, the network records' directory, the
    accelerator override and the sandbox switch.

    Yields once the agent said HELLO and the blueprint's readiness command
    succeeded through it. Leaving stops QEMU and removes the network.
    """
    bp = blueprint if isinstance(blueprint, Blueprint) else load_blueprint(blueprint)
    if image is None:
        image = await asyncio.to_thread(build_blueprint, bp, cache_dir=host.cache_root)
    if not bp.agent.enabled:
        raise SnapshotError("the blueprint has no guest agent ([agent] enabled = false)",
                            vm=bp.name)
    async with contextlib.AsyncExitStack() as stack:
        net = VMNetwork(f"{bp.name[:24]}-{short_id()}", forwards, run_dir=host.net_run_dir)
        await stack.enter_async_context(net)
        accel = (await host_accel(host)).accel
        config = VMConfig.from_image(
            image, cpu_model=cpu_model, agent=True, accel=accel, sandbox=host.qemu_sandbox,
            net=TapNet(net.tap_name, mac=net.guest_mac),
            kernel_args=tuple(net.guest_kernel_args().split()))
        vm = QemuVM(config, work_dir=work_dir, memory=memory,
                    disks={ROOT_DISK: disk, **(extra_disks or {})},
                    name=net.vm_id, wrap_argv=net.wrap_argv)
        await stack.enter_async_context(vm)
        progress(f"booting {bp.name} ({config.machine.memory_mib} MiB)")
        t0 = time.monotonic()
        await vm.start()
        agent = await stack.enter_async_context(
            connect_agent(vm.agent_socket, connect_timeout_s=30.0))
        try:
            await agent.wait_ready(boot_timeout_s)
        except AgentError as exc:
            hint = ("; the guest ran under KVM: if KVM is broken on this host, "
                    "retry with FERRY_ACCEL=tcg (or --accel tcg)"
                    if vm.accel is Accel.KVM else "")
            raise SnapshotError(f"the guest agent did not come up: {exc}{hint} (console: "
                                f"{vm.console_path})", vm=net.vm_id) from exc
        boot_s = time.monotonic() - t0
        progress(f"agent up after {boot_s:.1f} s; waiting for readiness")
        await _wait_ready(agent, bp.readiness, ready_timeout_s, vm=net.vm_id)
        yield Booted(image=image, vm=vm, net=net, agent=agent, config=config,
                     boot_to_agent_s=boot_s, ready_s=time.monotonic() - t0)


async def _wait_ready(agent: AgentClient, readiness: str | None, timeout_s: float,
                      *, vm: str) -> None:
    if not readiness:
        return
    deadline = time.monotonic() + timeout_s
    last = b""
    while True:
        result = await agent.exec(readiness, timeout_s=30.0)
        if result.ok:
            return
        last = result.stdout + result.stderr
        if time.monotonic() > deadline:
            raise SnapshotError(f"readiness {readiness!r} still failing after {timeout_s} s: "
                                f"{last[-400:].decode(errors='replace')}", vm=vm)
        await asyncio.sleep(READINESS_POLL_S)


async def snapshot(
    blueprint: Blueprint | str | Path,
    out_dir: Path,
    *,
    prepare: Sequence[str] = (),
    on_ready: OnReady | None = None,
    host: HostConfig,
    cpu_model: str = DEFAULT_CPU_MODEL,
    memory_mib: int | None = None,
    vcpus: int | None = None,
    extra_disks: Sequence[tuple[str, int]] = (),
    boot_timeout_s: float = 180.0,
    progress: Progress = _quiet,
    image_for: ImageFor | None = None,
    console_copy: Path | None = None,
) -> SnapshotReport:
    """Boot ``blueprint`` until ready, run ``prepare`` (shell commands, via the agent,
    each must exit 0) and then ``on_ready(agent)``, and write a package directory to
    ``out_dir`` (which must not exist).

    ``memory_mib`` overrides the blueprint's guest RAM (as ``docker run -m`` does an
    image's), validated as the blueprint's own value; the image is the same (its cache
    entry is shared), the package's machine and memory image have the new size.
    ``vcpus`` likewise overrides the blueprint's virtual CPUs (``docker run --cpus``).
    ``extra_disks``: (name, MiB) of empty data disks the guest gets besides its root disk
    (``/dev/vdb``, ``/dev/vdc``, ... in this order; sparse until written), kept in the
    package, its overlays and its migrations as the root disk is.

    ``image_for(disks_dir)`` builds the guest instead of :func:`build_blueprint` (an OCI
    image's guest, :mod:`ferry.oci.guest`): it returns a :class:`BuiltImage` whose
    ``blueprint`` is ``blueprint`` and whose root disk is a private copy in ``disks_dir``.

    ``console_copy``: where to keep the serial console of the boot (what the workload
    printed up to the snapshot), which is otherwise removed with QEMU's work dir."""
    started = time.monotonic()
    bp = blueprint if isinstance(blueprint, Blueprint) else load_blueprint(blueprint)
    if memory_mib is not None:
        bp = bp.with_memory(memory_mib)
    if vcpus is not None:
        bp = bp.with_vcpus(vcpus)
    check_extra_disks(extra_disks)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SnapshotError(f"{out_dir} already exists", vm=bp.name)
    progress(f"building {bp.name}")
    try:
        if image_for is not None:
            image = await asyncio.to_thread(image_for, out_dir / "disks")
        else:
            image = await asyncio.to_thread(build_blueprint, bp, out_dir / "disks",
                                            cache_dir=host.cache_root)
        build_s = time.monotonic() - started
        report = await _snapshot_into(bp, image, out_dir, prepare=prepare, on_ready=on_ready,
                                      console_copy=console_copy, extra_disks=extra_disks,
                                      cpu_model=cpu_model, host=host,
                                      boot_timeout_s=boot_timeout_s,
                                      progress=progress)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return SnapshotReport(package_dir=out_dir, manifest=report[0], build_s=build_s,
                          boot_to_agent_s=report[1], ready_s=report[2], device_state=report[3],
                          total_s=time.monotonic() - started)


async def _snapshot_into(
    bp: Blueprint, image: BuiltImage, out_dir: Path, *, prepare: Sequence[str],
    on_ready: OnReady | None, cpu_model: str, host: HostConfig, boot_timeout_s: float,
    console_copy: Path | None = None, extra_disks: Sequence[tuple[str, int]] = (),
    progress: Progress,
) -> tuple[VMManifest, float, float, DeviceStateStats]:
    disk_path = out_dir / "disks" / "root.img"
    os.replace(image.rootfs, disk_path)
    memory_bytes = bp.memory_mib * MIB
    work_dir = Path(tempfile.mkdtemp(prefix="ferry-snap-"))
    try:
        async with contextlib.AsyncExitStack() as extras:
            extra = {name: await extras.enter_async_context(FileDevice(
                        out_dir / "disks" / f"{name}.img", size_bytes=mib * MIB, create=True,
                        name=name)) for name, mib in extra_disks}
            async with (
                FileDevice(out_dir / MEMORY_PATH, size_bytes=memory_bytes, create=True,
                           name="memory") as memory,
                FileDevice(disk_path, name=ROOT_DISK) as disk,
                booted(bp, memory, disk, work_dir=work_dir, cpu_model=cpu_model,
                       host=host, image=image, boot_timeout_s=boot_timeout_s,
                       extra_disks=extra, progress=progress) as b,
            ):
                for command in prepare:
                    progress(f"prepare: {command}")
                    r = await b.agent.exec(command, timeout_s=120.0)
                    if not r.ok:
                        raise SnapshotError(f"prepare command {command!r} failed with "
                                            f"{r.exit_code}: {(r.stdout + r.stderr)[-400:]!r}",
                                            vm=bp.name)
                if on_ready is not None:
                    await on_ready(b.agent)
                progress("before-suspend hooks")
                await b.agent.before_suspend(timeout_s=60.0)
                progress("saving device state")
                stats = await b.vm.save_device_state(out_dir / STATE_PATH)
                accel = b.vm.accel
                shape = b.config.machine
                cmdline = b.vm.kernel_cmdline  # the line the guest booted with
                assert cmdline is not None, "set when QEMU was spawned"
                guest = b.net.guest
                qemu_version = ".".join(map(str, await b.vm.qemu_version()))
                await b.vm.stop()
                if console_copy is not None:
                    await asyncio.to_thread(shutil.copyfile, b.vm.console_path, console_copy)
                boot_s, ready_s = b.boot_to_agent_s, b.ready_s
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    progress("hashing blocks and writing the manifest")
    (out_dir / "boot").mkdir()
    await asyncio.to_thread(shutil.copyfile, image.kernel, out_dir / KERNEL_PATH)
    await asyncio.to_thread(shutil.copyfile, image.initramfs, out_dir / INITRAMFS_PATH)
    (out_dir / "hashes").mkdir()
    memory_entry = DeviceEntry("memory", MEMORY_PATH, memory_bytes, BLOCK_SIZE_BYTES,
                               "hashes/memory.xxh3")
    disk_entry = DeviceEntry(ROOT_DISK, "disks/root.img", disk_path.stat().st_size,
                             BLOCK_SIZE_BYTES, f"hashes/{ROOT_DISK}.xxh3")
    extra_entries = tuple(DeviceEntry(name, f"disks/{name}.img", mib * MIB, BLOCK_SIZE_BYTES,
                                      f"hashes/{name}.xxh3") for name, mib in extra_disks)
    for entry in (memory_entry, disk_entry, *extra_entries):
        await asyncio.to_thread(write_block_hashes, out_dir / entry.path,
                                out_dir / entry.hashes_path, entry.block_size_bytes)
    manifest = VMManifest(
        name=bp.name, blueprint=bp.name, image_key=image.key,
        created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        machine=MachineSpec.recording(shape, accel=accel.value if accel else "tcg",
                                      qemu=qemu_version),
        kernel_cmdline=cmdline, kernel=KERNEL_PATH, initramfs=INITRAMFS_PATH,
        state=STATE_PATH, state_bytes=stats.state_bytes, memory=memory_entry,
        disks=(disk_entry, *extra_entries),
        agent=AgentSettings(enabled=True, before_suspend=bp.agent.before_suspend,
                            after_resume=bp.agent.after_resume),
        network=GuestNetwork(ip=guest.ip, prefix_len=guest.prefix_len, gateway=guest.gateway,
                             mac=guest.mac),
        readiness=bp.readiness)
    manifest.write(out_dir)
    return manifest, boot_s, ready_s, stats


def write_block_hashes(device_file: Path, out: Path, block_size_bytes: int) -> int:
    """Write XXH3-128 of each block of ``device_file`` to ``out``; returns the block count."""
    count = 0
    with open(device_file, "rb") as src, open(out, "wb") as dst:
        while block := src.read(block_size_bytes):
            dst.write(block_hash(block))
            count += 1
    return count
