"""The VMs of this host as ``ferry vm list`` and the daemon's ``GET /v1/vms`` show them.

One function, so the CLI (reading the run directory itself) and the daemon (which
the ``ferry vm ls`` fast path asks) print the same thing. A receiver still waiting
for its VM (``ferry vm receive --listen``, before a source connected) has no VM
record yet; it keeps ``<run root>/receivers/<pid>.json`` meanwhile and is listed
with status ``waiting`` (id: its ``--name``, else ``receiver-<pid>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

from ferry.node.control import ControlClient
from ferry.vm import registry
from ferry.vm.errors import VMExistsError, VMNotFoundError
from ferry.vm.manifest import BOOT_CONSOLE_PATH
from ferry.vm.stopmode import StopMode


def qemu_memory_bytes(pid: int) -> int:
    """Guest RAM of a QEMU from its ``-m`` argument (0 if unreadable)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return 0
    for flag, value in itertools.pairwise(argv):
        if flag == b"-m" and value.upper().endswith(b"M") and value[:-1].isdigit():
            return int(value[:-1]) * 1024 * 1024
    return 0


def vm_view(v: registry.VMInfo, rec: dict[str, Any] | None) -> dict[str, Any]:
    """One VM; ``rec`` is its holder's record (memory, start time) if it runs."""
    memory = started = mirror_to = None
    if rec is not None:
        if isinstance(rec.get("mirror_to"), dict):
            mirror_to = dict(rec["mirror_to"])
        if isinstance(rec.get("qemu_pid"), int):
            memory = qemu_memory_bytes(rec["qemu_pid"]) or None
        if isinstance(rec.get("started_at"), int | float):
            started = float(rec["started_at"])
    return {"vm_id": v.vm_id, "status": v.status, "pid": v.pid, "package": v.package,
            "forwards": list(v.forwards), "resume_ms": v.resume_ms, "memory_bytes": memory,
            "started_at": started, "labels": dict(v.labels), "mirror_to": mirror_to}


RECEIVERS = "receivers"
WAITING = "waiting"


def receiver_record(paths: registry.VMPaths) -> Path:
    """Where this process, a receiver, says it is waiting."""
    return paths.run_root / RECEIVERS / f"{registry.this_process()['pid']}.json"


def write_receiver(path: Path, address: tuple[str, int], name: str | None) -> None:
    registry.private_dir(path.parent)
    registry.write_json(path, {**registry.this_process(), "listen": list(address),
                               "name": name, "started_at": time.time()})


def waiting_receivers(paths: registry.VMPaths) -> list[dict[str, Any]]:
    """The receivers here still waiting for a source, as :func:`vm_view` entries."""
    found = []
    for path in sorted((paths.run_root / RECEIVERS).glob("*.json")):
        rec = registry.read_json(path)
        if rec is None or not registry.process_alive(rec.get("pid"), rec.get("pid_start")):
            continue
        listen = rec.get("listen") or ["?", 0]
        name = rec.get("name")
        found.append({"vm_id": name if isinstance(name, str) else f"receiver-{rec['pid']}",
                      "status": WAITING, "pid": rec["pid"], "package": None,
                      "forwards": [f"listening on {listen[0]}:{listen[1]}"],
                      "resume_ms": None, "memory_bytes": None,
                      "started_at": rec.get("started_at"), "labels": {},
                      "mirror_to": None})
    return found


def cancel_receiver(paths: registry.VMPaths, vm_id: str) -> bool:
    """End the waiting receiver listed as ``vm_id`` (SIGTERM: it stops listening and
    exits); False if none waits under that id."""
    for w in waiting_receivers(paths):
        if w["vm_id"] == vm_id:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w["pid"], signal.SIGTERM)
            return True
    return False


def vm_views(paths: registry.VMPaths) -> list[dict[str, Any]]:
    """Every VM here (running, receiving, migrating, suspended) and every receiver still
    waiting for one, sorted by id."""
    views = [vm_view(v, registry.live_supervisor(paths, v.vm_id)
                     if v.status != "suspended" else None)
             for v in registry.list_vms(paths)]
    known = {v["vm_id"] for v in views}
    views += [w for w in waiting_receivers(paths) if w["vm_id"] not in known]
    return sorted(views, key=lambda v: str(v["vm_id"]))


def console_log(paths: registry.VMPaths, vm_id: str) -> Path | None:
    """The serial console log of ``vm_id``'s current QEMU (``console.N.log`` in its run
    dir, the highest generation N), or None if it runs nowhere here."""
    logs = []
    for path in paths.run_dir(vm_id).glob("console.*.log"):
        generation = path.name.split(".")[1]
        if generation.isdigit():
            logs.append((int(generation), path))
    return max(logs)[1] if logs else None


def boot_console(paths: registry.VMPaths, vm_id: str) -> Path | None:
    """The console of the boot ``vm_id``'s package was snapshotted in, if its package
    directory keeps one (``ferry vm run oci://``: the image's output up to the snapshot)."""
    for vm in registry.list_vms(paths):
        if vm.vm_id == vm_id and vm.package:
            path = Path(vm.package) / BOOT_CONSOLE_PATH
            return path if path.is_file() else None
    return None


MAX_LOG_BYTES = 1024 * 1024
"""What ``logs`` returns at most: the end of the console."""


def read_log(path: Path, *, offset: int = 0,
             max_bytes: int = MAX_LOG_BYTES) -> tuple[bytes, int]:
    """The console's bytes from ``offset`` (at most the last ``max_bytes``) and the offset
    after them (to follow it: pass it back)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            start = max(offset, size - max_bytes) if offset < size else size
            f.seek(start)
            data = f.read(size - start)
    except FileNotFoundError:
        return b"", offset
    return data, start + len(data)


async def inspect(paths: registry.VMPaths, vm_id: str) -> dict[str, Any] | None:
    """One VM in detail (``ferry vm inspect``, ``GET /v1/vms/{id}``): its :func:`vm_view`
    and, if it runs, its holder's status (QEMU's pid and CPU use, guest RAM read through
    FUSE, a running migration's progress). None if no VM of that id is here."""
    registry.check_vm_id(vm_id)
    found = {v["vm_id"]: v for v in await asyncio.to_thread(vm_views, paths)}.get(vm_id)
    if found is None:
        return None
    detail: dict[str, Any] = {**found, "qemu_pid": None, "memory_io": {}, "qemu_usage": {},
                              "migration": None, "user_data": None}
    if found["status"] in ("suspended", WAITING):
        return detail
    rec = registry.live_supervisor(paths, vm_id) or {}
    detail["user_data"] = rec.get("user_data")
    status = await ControlClient(paths.control_socket(vm_id), vm_id).status()
    return {**detail, "status": status.state.value, "qemu_pid": status.qemu_pid,
            "memory_io": dict(status.memory_io), "qemu_usage": dict(status.qemu_usage),
            "migration": dict(status.migration) if status.migration else None,
            "mirror": dict(status.mirror) if status.mirror else None}


async def remove(paths: registry.VMPaths, vm_id: str, *, force: bool) -> str:
    """``ferry vm rm`` and ``DELETE /v1/vms/{id}``: delete a suspended VM; with ``force``
    also stop a running one (discarding it) or end a waiting receiver. Returns what was
    done: ``stopped``, ``removed`` or ``cancelled``. Raises :class:`VMExistsError` for a
    running VM or a waiting receiver without ``force``, :class:`VMNotFoundError` if
    nothing of that id is here."""
    registry.check_vm_id(vm_id)
    if registry.live_supervisor(paths, vm_id) is not None:
        if not force:
            raise VMExistsError("is running: stop it ('ferry vm stop') or force its removal "
                                "('rm -f', '?force=true')", vm=vm_id)
        await ControlClient(paths.control_socket(vm_id), vm_id).stop(StopMode.DISCARD)
        return "stopped"
    if registry.remove_suspended(paths, vm_id):
        return "removed"
    if any(w["vm_id"] == vm_id for w in waiting_receivers(paths)):
        if not force:
            raise VMExistsError("is a receiver waiting for a VM: force its removal to end it "
                                "('rm -f', '?force=true')", vm=vm_id)
        cancel_receiver(paths, vm_id)
        return "cancelled"
    raise VMNotFoundError("no such VM here (see 'ferry vm list')", vm=vm_id)
