"""QEMU's seccomp sandbox: probed once per process, used for every QEMU ferry starts.

``-sandbox on`` installs a seccomp filter before the guest runs; the extra
switches also deny the obsolete system calls, raising privileges (set*uid),
spawning processes (fork/exec: ferry's QEMU never needs ``exec:`` migration or
tap scripts) and resource control (scheduling, NUMA policy). Measured on
QEMU 7.2 under TCG: a microvm boots, saves its device state to a UNIX socket,
and a second QEMU loads it with ``-incoming defer``, all under this filter.

QEMU built without seccomp refuses the option; the probe (QEMU with ``-M none``
told to quit over QMP at once, 40-110 ms here) notices that and ferry runs QEMU
without a sandbox, with a warning. ``VMConfig.sandbox`` (from the host's
``HostConfig.qemu_sandbox``: ``FERRY_QEMU_SANDBOX=off``) turns it off.

A supported sandbox is remembered for the host's boot
(:mod:`ferry.qemu.probecache`, ``/run/ferry/sandbox.json``), so a ``ferry vm run``
does not start a probe QEMU before its own: that probe was most of the
resume's device set-up time. Only "supported" is remembered: a cache entry can
never turn the sandbox off (an unsupported result is probed again each time).

``-runas`` is not used: see docs/security.md ("QEMU's privileges").
"""

from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path

from ferry.hostconfig import DEFAULT_RUN_ROOT
from ferry.qemu import probecache
from ferry.qemu.argv import QEMU_BINARY

log = logging.getLogger(__name__)

SANDBOX_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
PROBE_TIMEOUT_S = 10.0
CACHE_FILE = "sandbox.json"
_QUIT = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'


def probe_sandbox(option: str = SANDBOX_OPTION, qemu: str = QEMU_BINARY) -> bool:
    """Whether ``qemu`` starts and quits cleanly with ``-sandbox option``."""
    argv = [qemu, "-M", "none", "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-sandbox", option, "-qmp", "stdio"]
    try:
        proc = subprocess.run(argv, input=_QUIT, capture_output=True, timeout=PROBE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("QEMU sandbox probe failed to run: %s", exc)
        return False
    if proc.returncode != 0:
        log.warning("QEMU refuses -sandbox %s (%s): running QEMU without seccomp", option,
                    proc.stderr.decode(errors="replace").strip()[:300])
        return False
    return True


@functools.lru_cache(maxsize=4)
def sandbox_option(qemu: str = QEMU_BINARY, run_dir: Path = DEFAULT_RUN_ROOT) -> str | None:
    """The ``-sandbox`` value to use, or None (unsupported by ``qemu``).

    Whether to sandbox at all is the caller's (``VMConfig.sandbox``)."""
    cache = run_dir / CACHE_FILE
    key = probecache.host_key(qemu, option=SANDBOX_OPTION)
    hit = probecache.read(cache, key)
    if hit is not None and hit.get("supported") is True:
        return SANDBOX_OPTION
    if not probe_sandbox(SANDBOX_OPTION, qemu):
        return None
    probecache.write(cache, key, {"supported": True})
    return SANDBOX_OPTION
