"""The accelerator probe against stand-in QEMU executables (shell scripts).

Each stand-in plays one way a real QEMU behaves under a KVM of this kind:
hangs with no output (PVM's stuck guest), exits at once (PVM's MSR abort),
prints the marker (a working KVM), or prints it after the deadline.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferry.guest.image.kernel import Kernel
from ferry.hostconfig import Accel, HostConfig
from ferry.qemu import accel
from ferry.qemu.accel import (
    PROBE_MARKER,
    Source,
    choose_accel,
    probe_boot,
    probe_initramfs,
)

MARKER = PROBE_MARKER.decode()


def stand_in(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_marker_means_the_guest_booted(tmp_path: Path) -> None:
    qemu = stand_in(tmp_path, "ok", f"echo booting; echo {MARKER}; sleep 30")
    result = await probe_boot([str(qemu)], deadline_s=10)
    assert result.ok
    assert result.elapsed_s < 10


async def test_silent_hang_is_not_kvm(tmp_path: Path) -> None:
    qemu = stand_in(tmp_path, "hang", "echo 'Probing EDD (edd=off to disable)... ok'; "
                                      "exec sleep 30")
    result = await probe_boot([str(qemu)], deadline_s=0.5)
    assert not result.ok
    assert "did not boot within" in result.reason
    assert "Probing EDD" in result.console


async def test_immediate_exit_is_not_kvm(tmp_path: Path) -> None:
    qemu = stand_in(tmp_path, "abort", "echo 'failed to set MSR 0x10a' >&2; exit 134")
    result = await probe_boot([str(qemu)], deadline_s=10)
    assert not result.ok
    assert "exited (134)" in result.reason
    assert "failed to set MSR" in result.console


async def test_marker_after_the_deadline_is_not_kvm(tmp_path: Path) -> None:
    qemu = stand_in(tmp_path, "late", f"sleep 3; echo {MARKER}")
    result = await probe_boot([str(qemu)], deadline_s=0.5)
    assert not result.ok


def test_probe_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed outright (no finally runs) takes its probe QEMU along."""
    pidfile = tmp_path / "pid"
    qemu = stand_in(tmp_path, "hang", f"echo $$ > {pidfile}; exec sleep 30")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import asyncio, sys\n"
        "from ferry.qemu.accel import probe_boot\n"
        f"asyncio.run(probe_boot([{str(qemu)!r}], deadline_s=60))\n")])
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the probe outlived its killed parent")


async def test_probe_kills_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    qemu = stand_in(tmp_path, "hang", f"echo $$ > {pidfile}; exec sleep 30")
    await probe_boot([str(qemu)], deadline_s=0.5)
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_missing_binary_is_not_kvm(tmp_path: Path) -> None:
    result = await probe_boot([str(tmp_path / "nope")], deadline_s=10)
    assert not result.ok
    assert "nope" in result.console


async def test_override_skips_the_probe() -> None:
    choice = await choose_accel(Accel.KVM, kvm_device="/nonexistent")
    assert (choice.accel, choice.source) == (Accel.KVM, Source.OVERRIDE)


async def test_the_host_override_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment is not read: only the HostConfig passed in counts.
    monkeypatch.setenv("FERRY_ACCEL", "kvm")
    host = HostConfig.from_environ({"HOME": "/h", "FERRY_ACCEL": "tcg"})
    choice = await accel.host_accel(host)
    assert (choice.accel, choice.source) == (Accel.TCG, Source.OVERRIDE)


async def test_no_device_means_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_ACCEL", "kvm")  # ignored: the library reads no environment
    choice = await choose_accel(kvm_device="/nonexistent/kvm")
    assert choice.accel is Accel.TCG
    assert "does not exist" in choice.reason


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A usable-looking /dev/kvm (a plain file) and a fake guest kernel."""
    (tmp_path / "kvm").write_bytes(b"")
    boot = tmp_path / "kernel"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"not a kernel")
    kernel = Kernel("linux-image-x", "1", "1", boot / "vmlinuz", boot, cache_hit=True)
    monkeypatch.setattr("ferry.guest.image.kernel.fetch_kernel", lambda cache_dir: kernel)
    return tmp_path


async def test_probe_result_is_cached_per_boot(fake_host: Path) -> None:
    runs = fake_host / "runs"
    qemu = stand_in(fake_host, "ok", f"echo run >> {runs}; echo {MARKER}")
    kwargs = {"kvm_device": str(fake_host / "kvm"), "qemu": str(qemu),
              "run_dir": fake_host / "run", "deadline_s": 10.0}
    first = await choose_accel(**kwargs)  # type: ignore[arg-type]
    second = await choose_accel(**kwargs)  # type: ignore[arg-type]
    assert (first.accel, first.source) == (Accel.KVM, Source.PROBE)
    assert (second.accel, second.source) == (Accel.KVM, Source.CACHE)
    assert runs.read_text().count("run") == 1
    # A different QEMU binary (an upgrade) invalidates the cache.
    qemu.write_text(qemu.read_text() + "\n# upgraded\n")
    third = await choose_accel(**kwargs)  # type: ignore[arg-type]
    assert third.source is Source.PROBE
    assert runs.read_text().count("run") == 2


async def test_hanging_kvm_falls_back_to_tcg_with_reason(fake_host: Path) -> None:
    qemu = stand_in(fake_host, "hang", "exec sleep 30")
    choice = await choose_accel(kvm_device=str(fake_host / "kvm"), qemu=str(qemu),
                                run_dir=fake_host / "run", deadline_s=0.5)
    assert choice.accel is Accel.TCG
    assert choice.reason.startswith("KVM unusable: QEMU ran but the guest did not boot")


def test_probe_initramfs_has_the_marker_init(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake")
    out = probe_initramfs(busybox, tmp_path / "probe.cpio")
    data = out.read_bytes()
    assert data.startswith(b"070701")  # newc
    assert PROBE_MARKER in data
    assert b"TRAILER!!!" in data
    assert accel.PROBE_MARKER.decode() in accel._PROBE_INIT.decode()
