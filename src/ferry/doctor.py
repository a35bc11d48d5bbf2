"""``ferry doctor``: can this host run ferry's VMs, and what to do about each gap.

Every check does the real thing where that is cheap (start QEMU, open
``/dev/fuse``, create and delete a network namespace, list nft tables, boot a
guest for the accelerator) rather than trusting that a file exists. A check
is ``ok``, ``warn`` (ferry works, with a cost or a caveat) or ``fail`` (a VM
cannot run here until it is fixed); each non-ok check says what to do.
"""

from __future__ import annotations

import asyncio
import enum
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ferry.hostconfig import Accel, HostConfig
from ferry.qemu.accel import host_accel
from ferry.qemu.argv import QEMU_BINARY
from ferry.vm.registry import VMPaths

# Below this much free space, building images and writing packages fails.
MIN_FREE_BYTES = 2 * 2**30
SETUP_HINT = "run ./scripts/setup.sh (it installs every package ferry needs)"
# Host tools ferry runs, and the Debian package of each.
TOOLS = {"qemu-img": "qemu-utils", "ip": "iproute2", "nft": "nftables",
         "fusermount3": "fuse3", "busybox": "busybox-static", "mkfs.ext4": "e2fsprogs",
         "cc": "gcc", "setpriv": "util-linux"}


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    advice: str = ""
    output: str = ""  # what a failed probe printed, for whoever digs deeper

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "advice": self.advice, "output": self.output}


def _run(argv: list[str], timeout_s: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def check_qemu() -> Check:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        return Check("qemu", Status.FAIL, f"{QEMU_BINARY} not found", SETUP_HINT)
    try:
        out = _run([path, "--version"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("qemu", Status.FAIL, f"{path} does not run: {exc}", SETUP_HINT)
    first = out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()
    if out.returncode != 0:
        return Check("qemu", Status.FAIL, f"{path} --version failed: {first}", SETUP_HINT)
    return Check("qemu", Status.OK, f"{first} ({path})")


def check_tools() -> Check:
    missing = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return Check("tools", Status.FAIL, "missing: " + ", ".join(missing), SETUP_HINT)
    return Check("tools", Status.OK, ", ".join(TOOLS))


def check_fuse() -> Check:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return Check("fuse", Status.FAIL, f"cannot open /dev/fuse: {exc.strerror}",
                     "load the fuse module (modprobe fuse) and run as root")
    os.close(fd)
    return Check("fuse", Status.OK, "/dev/fuse opens read-write")


def check_tun() -> Check:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        return Check("tun", Status.FAIL, f"cannot open /dev/net/tun: {exc.strerror}",
                     "load the tun module (modprobe tun) and run as root")
    os.close(fd)
    return Check("tun", Status.OK, "/dev/net/tun opens read-write")


def check_netns() -> Check:
    name = f"ferry-doctor-{os.getpid()}"
    try:
        added = _run(["ip", "netns", "add", name])
        if added.returncode != 0:
            return Check("netns", Status.FAIL, f"ip netns add failed: {added.stderr.strip()}",
                         "ferry needs root (CAP_SYS_ADMIN) for network namespaces")
        _run(["ip", "netns", "delete", name])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("netns", Status.FAIL, f"cannot run ip: {exc}", SETUP_HINT)
    return Check("netns", Status.OK, "a namespace was created and deleted")


def check_nft() -> Check:
    try:
        out = _run(["nft", "list", "tables"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("nftables", Status.FAIL, f"cannot run nft: {exc}", SETUP_HINT)
    if out.returncode != 0:
        return Check("nftables", Status.FAIL, f"nft list tables failed: {out.stderr.strip()}",
                     "ferry needs root (CAP_NET_ADMIN) and nf_tables in the kernel")
    return Check("nftables", Status.OK, "nft answers")


def check_ip_forward() -> Check:
    try:
        value = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    except OSError as exc:
        return Check("ip_forward", Status.WARN, f"unreadable: {exc}")
    if value != "1":
        return Check("ip_forward", Status.WARN, "0: this host forwards no traffic between "
                     "interfaces", "sysctl -w net.ipv4.ip_forward=1 if VMs need to reach "
                     "other networks through this host")
    return Check("ip_forward", Status.OK, "1")


def check_space(name: str, path: Path) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return Check(name, Status.WARN, f"{path}: {exc}")
    free = f"{usage.free / 2**30:.1f} GiB free in {path}"
    if usage.free < MIN_FREE_BYTES:
        return Check(name, Status.FAIL, free,
                     f"free at least {MIN_FREE_BYTES // 2**30} GiB there")
    return Check(name, Status.OK, free)


async def check_accel(host: HostConfig) -> Check:
    choice = await host_accel(host)
    detail = f"{choice.accel.value}: {choice.reason} ({choice.source.value})"
    if choice.accel is Accel.TCG and choice.source.value != "override":
        return Check("accelerator", Status.WARN, detail,
                     "VMs run under TCG (software emulation): slower, but they work; "
                     "set FERRY_ACCEL=kvm to force KVM", output=choice.console)
    return Check("accelerator", Status.OK, detail)


def _ferry_mounts() -> list[str]:
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2].startswith("fuse") and "ferry" in line:
            found.append(fields[1])
    return found


def check_leftovers(paths: VMPaths) -> Check:
    """Namespaces, nft tables and records of ferry processes that are gone."""
    from ferry.net.state import RunDir

    stale = [f"network record {r.key} (pid {r.owner_pid} gone)"
             for r in RunDir(paths.net_run_dir).records() if not r.owner_alive()]
    mounts = []
    for mnt in _ferry_mounts():
        try:
            os.statvfs(mnt)
        except OSError:
            mounts.append(f"dead FUSE mount {mnt}")
    orphans = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            full = (proc / "cmdline").read_bytes()
            cmd = full.split(b"\0")[0]
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.endswith(QEMU_BINARY.encode()) and ppid == 1 and b"ferry" in full:
            orphans.append(f"orphaned QEMU pid {proc.name}")
    found = stale + mounts + orphans
    if found:
        return Check("leftovers", Status.WARN, "; ".join(found),
                     "run 'ferry doctor --clean' to remove what crashed runs left behind")
    return Check("leftovers", Status.OK, "none")


async def run_checks(host: HostConfig) -> list[Check]:
    """Every check of ``host``, in the order a person would fix them."""
    paths = VMPaths.of(host)
    sync_checks: list[Callable[[], Check]] = [
        check_qemu, check_tools, check_fuse, check_tun, check_netns, check_nft,
        check_ip_forward,
        lambda: check_space("cache space", host.cache_root),
        lambda: check_space("state space", paths.state_root),
        lambda: check_leftovers(paths),
    ]
    checks = [await asyncio.to_thread(c) for c in sync_checks]
    if checks[0].status is not Status.FAIL:
        checks.insert(1, await check_accel(host))
    return checks


async def clean(host: HostConfig) -> list[str]:
    """Remove leftovers of ``host``'s crashed runs (records, namespaces, tables, mounts,
    QEMUs)."""
    from ferry.net.state import cleanup_leftovers as net_cleanup
    from ferry.vm.registry import cleanup_leftovers as vm_cleanup

    paths = VMPaths.of(host)
    done = [f"vm {k}" for k in await vm_cleanup(paths)]
    done += [f"network {k}" for k in await net_cleanup(paths.net_run_dir)]
    for mnt in _ferry_mounts():
        try:
            os.statvfs(mnt)
        except OSError:
            await asyncio.to_thread(_run, ["umount", "-l", mnt])
            done.append(f"mount {mnt}")
    return done


def can_run_vms(checks: list[Check]) -> bool:
    return all(c.status is not Status.FAIL for c in checks)
