"""The control socket protocol and the VM registry, without QEMU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.node import control
from ferry.node.control import RemoteOpError
from ferry.vm.errors import VMNotFoundError
from ferry.vm.registry import (
    SUPERVISOR_RECORD,
    VM_RECORD,
    VMPaths,
    cleanup_leftovers,
    list_vms,
    this_process,
    write_json,
)
from ferry.vm.stopmode import StopMode


async def test_control_round_trip_and_errors(tmp_path: Path) -> None:
    seen: list[control.Request] = []
    release = asyncio.Event()

    async def handler(req: control.Request) -> control.Reply:
        seen.append(req)
        match req:
            case control.ExecRequest(shell="boom"):
                raise RuntimeError("it broke")
            case control.ExecRequest():
                return control.ExecReply(0, "EXITED", req.stdin, repr(req.command).encode())
            case control.StopRequest():
                await release.wait()
                return control.StopReply(req.mode)
            case _:
                return control.ErrorReply("not here", "Unsupported")

    sock = tmp_path / "c.sock"
    client = control.ControlClient(sock, "c1")
    async with control.serve_control(sock, handler):
        assert os.stat(sock).st_mode & 0o077 == 0  # owner only
        reply = await client.exec(["a", "b"], stdin=b"\x00x")
        assert (reply.stdout, reply.stderr) == (b"\x00x", b"['a', 'b']")
        shell = await client.exec("echo $X")
        assert shell.stderr == b"'echo $X'"
        with pytest.raises(RemoteOpError, match="it broke") as info:
            await client.exec("boom")
        assert info.value.kind == "RuntimeError"
        with pytest.raises(RemoteOpError, match="not here"):
            await client.status()
        # A malformed request gets an error reply, not a hang.
        r, w = await asyncio.open_unix_connection(os.fspath(sock))
        w.write(b"[1, 2]\n")
        await w.drain()
        assert b"bad request" in await r.readline()
        w.close()
        # Leaving waits for a request in flight (a stop replies after the VM is gone).
        slow = asyncio.create_task(client.stop(StopMode.SUSPEND))
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_later(0.1, release.set)
    assert (await slow).mode is StopMode.SUSPEND
    assert not sock.exists()
    with pytest.raises(VMNotFoundError):
        await client.status()


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
