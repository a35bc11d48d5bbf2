"""The real accelerator probe on this machine, and ``ferry doctor`` as a user runs it.

Whatever the probe chooses here must boot a guest: a probe that picks a KVM
which hangs (as PVM hosts of this kind do) fails this test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.guest.image.kernel import fetch_kernel
from ferry.hostconfig import Accel, HostConfig
from ferry.qemu.accel import Source, choose_accel, probe_argv, probe_boot, probe_initramfs
from ferry.qemu.argv import QEMU_BINARY, host_tsc_khz

pytestmark = pytest.mark.e2e

# These tests call the library directly: they pass it the host configuration of the
# environment they run in (FERRY_CACHE_DIR, FERRY_ACCEL ...), as the CLI does.
HOST = HostConfig.from_environ(os.environ)

FERRY = [sys.executable, "-m", "ferry.cli.main"]
BOOT_DEADLINE_S = 120.0  # TCG on a shared 2-core machine


async def test_the_chosen_accelerator_boots_a_guest(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_ACCEL", raising=False)
    choice = await choose_accel(kernel_cache_dir=HOST.cache_root, run_dir=tmp_path,
                                use_cache=False)
    assert choice.source is Source.PROBE
    assert choice.reason
    kernel = fetch_kernel(HOST.cache_root)
    initrd = probe_initramfs(Path("/bin/busybox"), tmp_path / "probe.cpio")
    argv = probe_argv(QEMU_BINARY, kernel.vmlinuz, initrd, tsc_khz=host_tsc_khz())
    argv[argv.index("-accel") + 1] = choice.accel.value
    if choice.accel is Accel.TCG:
        argv[argv.index("-cpu") + 1] = "max"
    result = await probe_boot(argv, deadline_s=BOOT_DEADLINE_S)
    assert result.ok, f"{choice.accel.value} was chosen ({choice.reason}) but: {result.reason}"


def test_doctor_reports_the_accelerator_and_why() -> None:
    out = subprocess.run([*FERRY, "doctor", "--json"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    accel = checks["accelerator"]
    assert accel["detail"].split(":")[0] in ("kvm", "tcg")
    assert len(accel["detail"]) > len("tcg: ")
    for name in ("qemu", "fuse", "tun", "netns", "nftables", "leftovers"):
        assert checks[name]["status"] == "ok", checks[name]


def test_doctor_fails_without_qemu(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "FERRY_RUN_DIR": str(tmp_path / "run")}
    out = subprocess.run([*FERRY, "doctor", "--json"], capture_output=True, text=True,
                         timeout=120, check=False, env=env)
    assert out.returncode == 1
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["qemu"]["status"] == "fail"
    assert "setup.sh" in checks["qemu"]["advice"]
