"""Choosing QEMU's accelerator: KVM when it really works, TCG otherwise.

``/dev/kvm`` existing is not enough: on a PVM host (a cloud VM that serves
KVM to its own guests) stock QEMU opens it and then aborts setting MSRs.
So the probe starts a tiny paused microvm with ``-accel kvm`` and checks it
is still alive after a short while; any failure means TCG. The answer is
cached for the life of the process.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time

from ferry.vm.image.qemu_cmd import QEMU_BINARY, Accel

log = logging.getLogger(__name__)

# QEMU with KVM reaches its main loop in well under a second; a failing KVM
# setup (PVM's MSR abort) dies within a few hundred milliseconds.
PROBE_ALIVE_S = 1.5


def _probe(kvm_device: str, qemu: str, alive_s: float) -> bool:
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return False
    argv = [qemu, "-accel", "kvm", "-M", "microvm", "-cpu", "host", "-m", "32M",
            "-nodefaults", "-no-user-config", "-display", "none", "-S"]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        log.info("KVM probe: cannot start %s: %s", qemu, exc)
        return False
    try:
        deadline = time.monotonic() + alive_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                log.info("KVM probe: QEMU exited %s: %s", proc.returncode, err.strip()[:500])
                return False
            time.sleep(0.05)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@functools.lru_cache(maxsize=8)
def probe_kvm(kvm_device: str = "/dev/kvm", qemu: str = QEMU_BINARY,
              alive_s: float = PROBE_ALIVE_S) -> bool:
    """True if QEMU can really run a guest with KVM here (cached per arguments)."""
    ok = _probe(kvm_device, qemu, alive_s)
    log.info("KVM usable: %s", ok)
    return ok


def best_accel() -> Accel:
    """KVM if :func:`probe_kvm` says it works, else TCG."""
    return Accel.KVM if probe_kvm() else Accel.TCG
