"""The control socket protocol and the VM registry, without QEMU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ferry.node import control
from ferry.vm.errors import ControlError, VMNotFoundError
from ferry.vm.registry import (
    SUPERVISOR_RECORD,
    VM_RECORD,
    VMPaths,
    cleanup_leftovers,
    list_vms,
    this_process,
    write_json,
)


async def test_control_round_trip_and_errors(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    release = asyncio.Event()

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        if req["op"] == "boom":
            raise RuntimeError("it broke")
        if req["op"] == "slow":
            await release.wait()
        return {"ok": True, "echo": req}

    sock = tmp_path / "c.sock"
    async with control.serve_control(sock, handler):
        assert os.stat(sock).st_mode & 0o077 == 0  # owner only
        reply = await control.request(sock, control.exec_payload(["a", "b"], stdin=b"\x00x"))
        assert reply["echo"]["argv"] == ["a", "b"]
        assert reply["echo"]["stdin"] == "AHg="
        shell = await control.request(sock, control.exec_payload("echo $X"))
        assert shell["echo"]["shell"] == "echo $X"
        with pytest.raises(ControlError, match="it broke"):
            await control.request(sock, {"op": "boom"})
        # A malformed request gets an error reply, not a hang.
        r, w = await asyncio.open_unix_connection(os.fspath(sock))
        w.write(b"[1, 2]\n")
        await w.drain()
        assert b"bad request" in await r.readline()
        w.close()
        # Leaving waits for a request in flight (a stop replies after the VM is gone).
        slow = asyncio.create_task(control.request(sock, {"op": "slow"}))
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_later(0.1, release.set)
    assert (await slow)["ok"]
    assert not sock.exists()
    with pytest.raises(VMNotFoundError):
        await control.request(sock, {"op": "status"})


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


async def test_registry_lists_and_cleans(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "run", tmp_path / "state")
    for vm_id in ("alive", "dead", "gone"):
        paths.run_dir(vm_id).mkdir(parents=True)
        paths.state_dir(vm_id).mkdir(parents=True)
    write_json(paths.run_dir("alive") / SUPERVISOR_RECORD,
               {**this_process(), "status": "running", "forwards": ["x"],
                "resume": {"total_s": 0.25}})
    dead = {"pid": _dead_pid(), "pid_start": 1, "status": "running"}
    write_json(paths.run_dir("dead") / SUPERVISOR_RECORD, dead)
    write_json(paths.state_dir("dead") / VM_RECORD, {"status": "running"})
    write_json(paths.run_dir("gone") / SUPERVISOR_RECORD, dead)
    write_json(paths.state_dir("gone") / VM_RECORD, {"status": "suspended",
                                                     "package_dir": "/p"})
    listed = {v.vm_id: (v.status, v.resume_ms) for v in list_vms(paths)}
    assert listed == {"alive": ("running", 250.0), "gone": ("suspended", None)}

    removed = await cleanup_leftovers(paths)
    assert any("discarded" in r and "dead" in r for r in removed)
    assert paths.run_dir("alive").exists()
    assert not paths.run_dir("dead").exists()
    assert not paths.state_dir("dead").exists()  # running when it died: no consistent state
    assert not paths.run_dir("gone").exists()
    assert paths.state_dir("gone").exists()  # suspended VMs are kept
