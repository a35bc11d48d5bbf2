"""Where VMs live on a host, the records their supervisors keep, and crash cleanup.

::

    <run root>/vms/<id>/          (HostConfig.run_root: /run/ferry) gone at reboot
        supervisor.json           pid + start time of the supervisor and of QEMU, status,
                                  forwards, resume timings
        control.sock              the supervisor's control socket (ferry.node.control)
        qmp.sock nbd.sock agent.sock mnt/ console.N.log qemu.N.log   (QemuVM's work dir)
    <run root>/net/               ferry.net's records (namespaces, links, nft tables)
    <state root>/vms/<id>/        (HostConfig.state_root: /var/lib/ferry) survives
        vm.json                   package, status "running" or "suspended"
        memory.ovl(.map) root.ovl(.map)   copy-on-write overlays over the package's files
        state.bin                 device state saved by a suspend

A supervisor that died (even by SIGKILL) leaves its run dir, maybe a QEMU
(normally killed with it through PDEATHSIG), a dead FUSE mount and its
network. :func:`cleanup_leftovers` removes all of it; the overlays of a VM
that was *running* when its supervisor died no longer match any saved device
state, so they are deleted too (a suspended VM's are kept).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.expose.fuse.errors import MountError
from ferry.hostconfig import HostConfig
from ferry.net import cleanup_leftovers as cleanup_net_leftovers
from ferry.net.state import process_start_time
from ferry.vm.errors import VMSpecError

log = logging.getLogger(__name__)

SUPERVISOR_RECORD = "supervisor.json"
VM_RECORD = "vm.json"
CONTROL_SOCKET = "control.sock"

_VM_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def check_vm_id(vm_id: str) -> str:
    """``[a-z0-9-]``, at most 40 characters: the id names namespaces and nft tables."""
    if not _VM_ID_RE.match(vm_id):
        raise VMSpecError(f"invalid VM id {vm_id!r}: use [a-z0-9-], at most 40 characters")
    return vm_id


@dataclass(frozen=True, slots=True)
class VMPaths:
    """The directories of one host's VMs (see the module docstring)."""

    run_root: Path
    state_root: Path

    @classmethod
    def of(cls, host: HostConfig) -> VMPaths:
        """``host``'s run and state roots (``$FERRY_RUN_DIR``, ``$FERRY_STATE_DIR``)."""
        return cls(host.run_root, host.state_root)

    @property
    def net_run_dir(self) -> Path:
        """The same directory as ``HostConfig.net_run_dir``."""
        return self.run_root / "net"

    def run_dir(self, vm_id: str) -> Path:
        return self.run_root / "vms" / check_vm_id(vm_id)

    def state_dir(self, vm_id: str) -> Path:
        return self.state_root / "vms" / check_vm_id(vm_id)

    def control_socket(self, vm_id: str) -> Path:
        return self.run_dir(vm_id) / CONTROL_SOCKET


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (temp file + rename), mode 0600: records name VMs."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    """``path`` and any missing parents created, ``path`` itself owner-only (0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_alive(pid: object, start: object) -> bool:
    """Whether ``pid`` runs and is the same process (same start time) as recorded."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = process_start_time(pid)
    return now is not None and (start is None or now == start)


def this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "pid_start": process_start_time(pid)}


@dataclass(frozen=True, slots=True)
class VMInfo:
    """One VM as ``ferry vm list`` shows it."""

    vm_id: str
    status: str
    pid: int | None
    package: str | None
    forwards: tuple[str, ...]
    resume_ms: float | None
    labels: Mapping[str, str] = field(default_factory=dict)


def list_vms(paths: VMPaths) -> list[VMInfo]:
    """Running VMs (live supervisors) and suspended ones, sorted by id."""
    found: dict[str, VMInfo] = {}
    for rec_path in sorted((paths.run_root / "vms").glob(f"*/{SUPERVISOR_RECORD}")):
        rec = read_json(rec_path)
        if rec is None or not process_alive(rec.get("pid"), rec.get("pid_start")):
            continue
        if rec.get("vm_id", rec_path.parent.name) != rec_path.parent.name \
                or rec.get("status") == "warm":
            continue  # a warm VM: unnamed yet, or listed under its name (a symlink)
        resume = rec.get("resume") or {}
        total = resume.get("total_s")
        found[rec_path.parent.name] = VMInfo(
            rec_path.parent.name, str(rec.get("status", "?")), rec.get("pid"),
            rec.get("package_dir"), tuple(rec.get("forwards", ())),
            round(total * 1e3, 1) if isinstance(total, int | float) else None,
            _labels(rec))
    for rec_path in sorted((paths.state_root / "vms").glob(f"*/{VM_RECORD}")):
        vm_id = rec_path.parent.name
        rec = read_json(rec_path)
        if vm_id in found or rec is None or rec.get("status") != "suspended":
            continue
        found[vm_id] = VMInfo(vm_id, "suspended", None, rec.get("package_dir"), (), None,
                              _labels(rec))
    return [found[k] for k in sorted(found)]


def _labels(rec: Mapping[str, Any]) -> dict[str, str]:
    """A record's labels (our own file; entries that are not text are dropped)."""
    raw = rec.get("labels")
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def saved_labels(paths: VMPaths, vm_id: str) -> dict[str, str]:
    """The labels the suspended VM ``vm_id`` was running with."""
    return _labels(read_json(paths.state_dir(vm_id) / VM_RECORD) or {})


def remove_suspended(paths: VMPaths, vm_id: str) -> bool:
    """Delete the suspended VM ``vm_id`` (its overlays and saved device state); False if
    there is no suspended VM of that id (a running one is stopped, not removed)."""
    state = paths.state_dir(vm_id)
    rec = read_json(state / VM_RECORD)
    if rec is None or rec.get("status") != "suspended" or live_supervisor(paths, vm_id):
        return False
    shutil.rmtree(state)
    return True


def live_supervisor(paths: VMPaths, vm_id: str) -> dict[str, Any] | None:
    """The record of ``vm_id``'s supervisor if it is alive."""
    rec = read_json(paths.run_dir(vm_id) / SUPERVISOR_RECORD)
    if rec is not None and process_alive(rec.get("pid"), rec.get("pid_start")):
        return rec
    return None


async def cleanup_leftovers(paths: VMPaths) -> list[str]:
    """Remove what dead supervisors left behind; returns a description of each removal."""
    removed: list[str] = []
    vms_dir = paths.run_root / "vms"
    for run_dir in sorted(vms_dir.glob("*")) if vms_dir.is_dir() else []:
        if run_dir.is_symlink():  # a warm VM's name: its own directory is cleaned below
            if not run_dir.exists():
                run_dir.unlink()
                removed.append(f"removed the dangling name {run_dir}")
            continue
        if not run_dir.is_dir():
            continue
        rec = read_json(run_dir / SUPERVISOR_RECORD) or {}
        if process_alive(rec.get("pid"), rec.get("pid_start")):
            continue
        if not rec and _younger_than_a_minute(run_dir):
            continue  # a supervisor is creating it right now
        qemu_pid = rec.get("qemu_pid")
        if process_alive(qemu_pid, rec.get("qemu_start")):
            assert isinstance(qemu_pid, int)
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_pid, signal.SIGKILL)
            removed.append(f"killed QEMU {qemu_pid} of {run_dir.name}")
        # Here, not at the top: pyfuse3 and trio cost every CLI command ~0.1 s to import.
        from ferry.expose.fuse.mount import clean_stale_mount

        try:
            if await clean_stale_mount(str(run_dir / "mnt"), owner_dead=True):
                removed.append(f"unmounted {run_dir / 'mnt'}")
        except MountError as exc:
            log.warning("leaving %s: %s", run_dir, exc)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(f"removed {run_dir}")
        state = paths.state_root / "vms" / run_dir.name
        vm_rec = read_json(state / VM_RECORD)
        if vm_rec is not None and vm_rec.get("status") == "running":
            shutil.rmtree(state, ignore_errors=True)
            removed.append(f"discarded {state} (it was running when its supervisor died)")
    states = paths.state_root / "vms"
    for link in sorted(states.glob("*")) if states.is_dir() else []:
        if link.is_symlink() and not link.exists():
            link.unlink()
            removed.append(f"removed the dangling name {link}")
    removed += [f"network {key}" for key in await cleanup_net_leftovers(paths.net_run_dir)]
    for line in removed:
        log.warning("leftover: %s", line)
    return removed


def _younger_than_a_minute(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < 60
    except OSError:
        return False
