"""Choosing QEMU's accelerator: KVM only when a guest really runs under it.

``/dev/kvm`` existing, or even QEMU starting with ``-accel kvm``, proves
nothing. Machines of this kind serve ``/dev/kvm`` through PVM, and it fails in
two ways. On some, QEMU aborts at once (an MSR write). On others (``kvm-pvm``,
``nested_pvm=1``), QEMU runs happily while a stock guest kernel stops in early
boot (``Probing EDD``) and the host logs ``INTERNAL_ERROR in batch emul``. So
the probe boots the guest kernel ferry uses, with a one-file initramfs whose
``/init`` prints :data:`PROBE_MARKER` on the serial console and reboots
(QEMU's ``-no-reboot`` turns that into an exit). KVM is chosen only if the
marker appears within :data:`PROBE_DEADLINE_S`; anything else means TCG, with
the reason logged once.

The choice is cached in ``/run/ferry/accel.json`` (``/run/ferry`` is a tmpfs,
so the cache lives as long as the host boot), keyed by the boot id, the host
kernel, the QEMU binary and the CPU model: one probe per boot, not per
command. The host's ``HostConfig.accel`` (``FERRY_ACCEL=auto|kvm|tcg``, or the
CLI's ``--accel``), passed as ``override``, skips the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.guest.image.tree import Tree, write_newc
from ferry.hostconfig import DEFAULT_RUN_ROOT, Accel, HostConfig
from ferry.qemu import probecache
from ferry.qemu.argv import QEMU_BINARY, host_tsc_khz
from ferry.shape import DEFAULT_CPU_MODEL

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = DEFAULT_RUN_ROOT
"""Where the choice is cached: the machine's run root, whatever root a ferry host uses."""
CACHE_FILE = "accel.json"

PROBE_MARKER = b"FERRY-ACCEL-PROBE-OK"
# The cloud kernel reaches userspace in well under a second under a working
# KVM (2-3 s under TCG here). A PVM host that cannot run it hangs forever, so
# the deadline bounds what a broken KVM costs: once per host boot.
PROBE_DEADLINE_S = 6.0
# Bytes of console output kept for the reason when the probe fails.
_TAIL_BYTES = 400

_PROBE_INIT = b"""#!/bin/sh
echo FERRY-ACCEL-PROBE-OK
reboot -f
"""


class Source(enum.Enum):
    """Where a choice came from."""

    OVERRIDE = "override"  # HostConfig.accel: FERRY_ACCEL or --accel
    PROBE = "probe"  # a guest was booted just now
    CACHE = "cache"  # a guest was booted earlier in this host boot


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator and why it was chosen."""

    accel: Accel
    reason: str
    source: Source
    probe_s: float | None = None  # how long the probe took, when one ran
    console: str = ""  # the last lines QEMU and the guest printed, when the probe failed

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["accel"] = self.accel.value
        data["source"] = self.source.value
        return data


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe boot showed."""

    ok: bool
    reason: str
    elapsed_s: float
    console: str = ""  # the last lines printed (QEMU's errors, the guest's console)


def probe_argv(qemu: str, kernel: Path, initramfs: Path, *, tsc_khz: int,
               cpu_model: str = DEFAULT_CPU_MODEL) -> list[str]:
    """The probe's QEMU command line: the guest kernel on microvm under KVM, serial on stdout.

    The CPU model is the one VMs run with: on a PVM host ``host`` makes QEMU
    abort while ``Nehalem-v1`` starts and then hangs in the guest, so only the
    real model gives the real answer.
    """
    cmdline = (f"console=ttyS0 reboot=k panic=-1 tsc_early_khz={tsc_khz} quiet "
               "rdinit=/init")
    return [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-accel", "kvm", "-cpu", cpu_model, "-m", "128M", "-M", "microvm",
            "-kernel", str(kernel), "-initrd", str(initramfs), "-append", cmdline,
            "-serial", "stdio"]


async def probe_boot(argv: list[str], *, deadline_s: float = PROBE_DEADLINE_S) -> ProbeResult:
    """Run ``argv`` and wait for :data:`PROBE_MARKER` on its stdout within ``deadline_s``.

    The process is killed however this ends, cancellation included.
    """
    started = time.monotonic()
    # If this process is killed outright (SIGKILL: no finally runs), the kernel kills
    # the probe too, instead of leaving a QEMU spinning in a hung guest forever.
    setpriv = shutil.which("setpriv")
    launcher = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
    try:
        proc = await asyncio.create_subprocess_exec(
            *launcher, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return ProbeResult(False, f"cannot start {argv[0]}: {exc.strerror or exc}", 0.0)
    assert proc.stdout is not None
    seen = bytearray()
    try:
        async with asyncio.timeout(deadline_s):
            while PROBE_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen += chunk
                del seen[:-4096]
        elapsed = time.monotonic() - started
        if PROBE_MARKER in seen:
            return ProbeResult(True, f"a guest booted in {elapsed:.2f} s", elapsed)
        code = await proc.wait()
        return ProbeResult(False, f"QEMU exited ({code}) before the guest booted",
                           elapsed, _tail(seen))
    except TimeoutError:
        return ProbeResult(False, f"QEMU ran but the guest did not boot within "
                                  f"{deadline_s:.0f} s", time.monotonic() - started, _tail(seen))
    finally:
        # The whole process group: nothing the probe started may hold its pipe open.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _tail(data: bytes | bytearray) -> str:
    text = bytes(data[-_TAIL_BYTES:]).decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:]) if lines else "nothing printed"


def probe_initramfs(busybox: Path, out: Path) -> Path:
    """Write the probe's initramfs (busybox as ``/bin/sh``, the marker-printing ``/init``)."""
    tree = Tree()
    for d in ("/bin", "/dev", "/proc", "/sys"):
        tree.mkdir(d)
    tree.copy("/bin/busybox", busybox, mode=0o755)
    for applet in ("sh", "echo", "reboot"):
        tree.symlink(f"/bin/{applet}", "/bin/busybox")
    tree.chardev("/dev/console", 5, 1)
    tree.write("/init", _PROBE_INIT, mode=0o755)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write_newc(tree, f)
    os.replace(tmp, out)
    return out


def cache_key(qemu: str, cpu_model: str) -> dict[str, str]:
    """What a cached choice depends on: this boot, the host kernel, QEMU, the CPU model."""
    return probecache.host_key(qemu, cpu_model=cpu_model)


def _read_cache(path: Path, key: dict[str, str]) -> AccelChoice | None:
    data = probecache.read(path, key)
    if data is None:
        return None
    try:
        return AccelChoice(Accel(data["accel"]), str(data["reason"]), Source.CACHE,
                           data.get("probe_s"), str(data.get("console", "")))
    except (ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, key: dict[str, str], choice: AccelChoice) -> None:
    probecache.write(path, key, choice.to_json())


def _device_problem(kvm_device: str) -> str | None:
    if not os.path.exists(kvm_device):
        return f"{kvm_device} does not exist"
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return f"{kvm_device} is not readable and writable by this user"
    return None


@dataclass(frozen=True, slots=True)
class _Probe:
    argv: list[str]
    key: dict[str, str]


def _prepare(qemu: str, cache: Path | None, cpu_model: str,
             kernel_cache_dir: Path) -> AccelChoice | _Probe:
    """A cached choice, or the probe to run (fetches the guest kernel the first time)."""
    from ferry.guest.image.kernel import fetch_kernel

    key = cache_key(qemu, cpu_model)
    if cache is not None and (hit := _read_cache(cache, key)) is not None:
        return hit
    kernel = fetch_kernel(kernel_cache_dir)
    busybox = shutil.which("busybox") or "/bin/busybox"
    initrd = probe_initramfs(Path(busybox), kernel.vmlinuz.parent / "accel-probe.cpio")
    return _Probe(probe_argv(qemu, kernel.vmlinuz, initrd, tsc_khz=host_tsc_khz(),
                             cpu_model=cpu_model), key)


async def choose_accel(
    override: Accel | None = None, *, kernel_cache_dir: Path | None = None,
    kvm_device: str = "/dev/kvm", qemu: str = QEMU_BINARY, deadline_s: float = PROBE_DEADLINE_S,
    run_dir: Path | None = None, use_cache: bool = True, cpu_model: str = DEFAULT_CPU_MODEL,
) -> AccelChoice:
    """The accelerator to use here, and why (see the module docstring).

    ``override`` (the host's ``HostConfig.accel``) is used without a probe; the
    probe fetches its guest kernel into ``kernel_cache_dir`` (None: the default
    image cache, ``~/.cache/ferry``). :func:`host_accel` passes both from a host.
    """
    if override is not None:
        return AccelChoice(override, f"accel={override.value} (set by the user: "
                           "FERRY_ACCEL or --accel)", Source.OVERRIDE)
    if kernel_cache_dir is None:
        kernel_cache_dir = HostConfig.from_environ({}).cache_root
    if (problem := _device_problem(kvm_device)) is not None:
        return AccelChoice(Accel.TCG, problem, Source.PROBE)
    # The accelerator is the machine's, not one ferry instance's: one cache per host
    # boot, whatever FERRY_RUN_DIR a test or demo host uses.
    cache = (run_dir or DEFAULT_RUN_DIR) / CACHE_FILE
    try:
        prepared = await asyncio.to_thread(_prepare, qemu, cache if use_cache else None,
                                           cpu_model, kernel_cache_dir)
    except Exception as exc:  # any failure to get a kernel means "cannot probe"
        return AccelChoice(Accel.TCG, f"no guest kernel to probe KVM with ({exc})",
                           Source.PROBE)
    if isinstance(prepared, AccelChoice):
        return prepared
    result = await probe_boot(prepared.argv, deadline_s=deadline_s)
    choice = AccelChoice(Accel.KVM if result.ok else Accel.TCG,
                         f"KVM works: {result.reason}" if result.ok
                         else f"KVM unusable: {result.reason}",
                         Source.PROBE, round(result.elapsed_s, 3), result.console)
    log.info("accelerator: %s (%s%s)", choice.accel.value, choice.reason,
             f"; console: {result.console}" if result.console else "")
    await asyncio.to_thread(_write_cache, cache, prepared.key, choice)
    return choice


async def host_accel(host: HostConfig) -> AccelChoice:
    """:func:`choose_accel` with ``host``'s override and image cache."""
    return await choose_accel(host.accel, kernel_cache_dir=host.cache_root)


def best_accel(host: HostConfig | None = None) -> Accel:
    """:func:`choose_accel` (for ``host`` if given) for synchronous callers outside an
    event loop."""
    if host is None:
        return asyncio.run(choose_accel()).accel
    return asyncio.run(host_accel(host)).accel


def probe_kvm() -> bool:
    """Whether KVM is the accelerator :func:`choose_accel` picks (synchronous)."""
    return best_accel() is Accel.KVM
