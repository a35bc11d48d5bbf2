"""Mirror a Redis VM under write load to a real SeaweedFS, SIGKILL it, restore it elsewhere.

One VM, one restore. The "other host" is this machine with its own ferry
directories (``FERRY_RUN_DIR``, ``FERRY_STATE_DIR``, package cache) and another
VM id: the restore has nothing of the first host but the bucket (no package, no
overlays, no state). What is not exercised: a separate network namespace for
the restoring host (both reach SeaweedFS on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.s3 import Layout, ObjectStore
from ferry.s3.vmcheckpoint import list_records, load_record
from ferry.testing.packages import Signer
from ferry.testing.s3 import SeaweedFS
from ferry.testing.site import stop_holders
from ferry.testing.workload import RedisWriter
from ferry.vm.registry import VMPaths

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]
CLI_TIMEOUT_S = 180.0
TAG = "mirror"


@dataclass(frozen=True, slots=True)
class Host:
    root: Path
    paths: VMPaths
    env: dict[str, str]

    def ferry(self, *args: str) -> dict[str, object]:
        proc = subprocess.run([*FERRY, *args, "--json"], env=self.env, capture_output=True,
                              text=True, timeout=CLI_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            pytest.fail(f"ferry {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        out = json.loads(proc.stdout)
        assert isinstance(out, dict)
        return out

    def cleanup(self) -> None:
        asyncio.run(stop_holders(self.paths))
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _host(name: str, signer: Signer, seaweedfs: SeaweedFS) -> Host:
    root = Path(tempfile.mkdtemp(prefix=f"f{name}-"))  # short: UNIX socket paths
    paths = VMPaths(root / "run", root / "state")
    env = {**os.environ, **signer.env, **seaweedfs.env(),
           "FERRY_RUN_DIR": str(paths.run_root), "FERRY_STATE_DIR": str(paths.state_root),
           "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    return Host(root, paths, env)


@pytest.fixture(scope="module")
def hosts(signer: Signer, seaweedfs: SeaweedFS) -> Iterator[tuple[Host, Host]]:
    a, b = _host("ma", signer, seaweedfs), _host("mb", signer, seaweedfs)
    try:
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _mirror_status(host: Host, vm_id: str) -> dict[str, object]:
    detail = host.ferry("vm", "inspect", vm_id)
    mirror = detail["mirror"]
    assert isinstance(mirror, dict)
    return mirror


async def _wait_checkpoints(host: Host, vm_id: str, at_least: int,
                            timeout_s: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await asyncio.to_thread(_mirror_status, host, vm_id)
        checkpoints = status["checkpoints"]
        assert isinstance(checkpoints, int)
        if checkpoints >= at_least:
            return status
        assert time.monotonic() < deadline, f"mirror did not reach {at_least}: {status}"
        await asyncio.sleep(0.5)


def test_mirror_kill_restore_keeps_every_write_before_the_checkpoint(
        hosts: tuple[Host, Host], redis_package: Path, seaweedfs: SeaweedFS,
        store: ObjectStore) -> None:
    a, b = hosts
    url = f"s3://{store.bucket}/{TAG}-vm"
    layout = Layout(root=f"{TAG}-vm/")
    src_id, dst_id = f"{TAG}-src-{secrets.token_hex(2)}", f"{TAG}-dst-{secrets.token_hex(2)}"
    port_a, port_b = _free_port(), _free_port()
    ready = a.ferry("vm", "run", "--detach", "--name", src_id, "-p", f"127.0.0.1:{port_a}:6379",
                    "--mirror", url, "--mirror-interval", "1", str(redis_package))
    assert ready["mirror"] == {"url": url, "interval_s": 1.0}
    holder_pid, qemu_pid = _int(ready["pid"]), _int(ready["qemu_pid"])

    async def load_then_kill() -> tuple[RedisWriter, dict[str, object]]:
        writer = RedisWriter([("127.0.0.1", port_a)], prefix="m")
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        try:
            await writer.wait_acknowledged(50)
            first = await _wait_checkpoints(a, src_id, 1)
            # Another checkpoint taken under the write load, then S3 goes away:
            # checkpoints fail, the VM keeps serving writes, and when S3 is back the
            # mirror resumes.
            await _wait_checkpoints(a, src_id, _int(first["checkpoints"]) + 1)
            await asyncio.to_thread(seaweedfs.stop)
            try:
                acked = writer.acknowledged_count
                await writer.wait_acknowledged(acked + 50)  # the VM runs without S3
                deadline = time.monotonic() + 60
                while (await asyncio.to_thread(_mirror_status, a, src_id))["failures"] == 0:
                    assert time.monotonic() < deadline, "no failed checkpoint without S3"
                    await asyncio.sleep(0.5)
            finally:
                # Not in a worker thread: weed dies with the thread that started it
                # (PDEATHSIG), and asyncio's worker threads end with the loop.
                seaweedfs.start()
            failing = await asyncio.to_thread(_mirror_status, a, src_id)
            status = await _wait_checkpoints(a, src_id, _int(failing["checkpoints"]) + 1)
            assert status["state"] == "mirroring"
            # The host dies: QEMU and its holder, without a word. QEMU first: a holder
            # killed in the middle of a flush stays a zombie stuck on its own FUSE mount,
            # and QEMU with it, until the connection is aborted (the leftover cleanup
            # does that; a real dead host has no kernel left to wedge).
            os.kill(qemu_pid, signal.SIGKILL)
            os.kill(holder_pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _alive(qemu_pid) or _alive(holder_pid):
                assert time.monotonic() < deadline, "QEMU outlived the kill"
                await asyncio.sleep(0.1)
        finally:
            # Writes to the dead VM would retry forever: the writer is cancelled (what it
            # counted as acknowledged stays).
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return writer, status

    writer, status = asyncio.run(load_then_kill())
    assert _int(status["failures"]) >= 1
    newest = list_records(store, layout, newest=1)[0]
    record = load_record(store, layout, newest)
    assert record.sequence >= 3
    url2 = f"s3://{store.bucket}/{TAG}-vm2"
    restored = b.ferry("vm", "restore", url, "--name", dst_id, "-p",
                       f"127.0.0.1:{port_b}:6379", "--detach", "--mirror", url2,
                       "--mirror-interval", "1")
    point = restored["restored_from"]
    assert isinstance(point, dict)
    assert point["sequence"] == record.sequence
    assert point["checkpoint_unix_s"] == pytest.approx(record.created_unix_s)

    async def check() -> tuple[list[int], list[int], int]:
        writer.targets = [("127.0.0.1", port_b)]
        before = writer.acknowledged_before(record.created_unix_s)
        lost = await writer.lost(before)
        after = [n for n in writer.acknowledged if n not in set(before)]
        return before, lost, len(after) - len(await writer.lost(after))

    before, lost, later_present = asyncio.run(check())
    # Every write acknowledged before the checkpoint's instant is there; writes made
    # under load while S3 was down and after it came back are among them.
    assert len(before) > 100
    assert lost == []
    # The restored VM is mirrored again, to another prefix (its objects fetched lazily first).
    asyncio.run(_wait_checkpoints(b, dst_id, 1))
    second = load_record(store, Layout(root=f"{TAG}-vm2/"))
    assert second.vm_id == dst_id
    assert second.package_id == record.package_id
    b.ferry("vm", "stop", dst_id)
    print(f"restored checkpoint {record.sequence}: {len(before)} writes before it, "
          f"{later_present} later ones present too; resume "
          f"{restored['resume']['running_s']:.2f} s")  # type: ignore[index]
