"""Real FUSE mounts of ferry devices, used by separate processes.

The daemon runs in the test's own event loop, so the test never does
blocking I/O on the mount from its thread: a subprocess (or a worker thread)
does it while the loop keeps serving requests.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferry.buffers import Buffer
from ferry.errors import DeviceError
from ferry.expose.fuse import (
    NO_TUNING,
    BdiTuning,
    FlushError,
    FuseMount,
    MountError,
    SessionBusyError,
    find_mount,
)
from ferry.expose.fuse.bdi import BdiTuner, bdi_dir, read_values
from ferry.storage.modules.waiting import waiting_cache
from ferry.storage.providers.memory import MemoryDevice

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting FUSE here needs root"),
]

MiB = 1 << 20
SRC = str(Path(__file__).resolve().parents[2] / "src")


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-page bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def run_py(code: str, *args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Run a Python snippet in a separate process; the loop keeps serving FUSE meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(code), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_py_ok(code: str, *args: str) -> str:
    rc, out, err = await run_py(code, *args)
    assert rc == 0, err
    return out


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        yield mnt
    finally:
        if find_mount(mnt) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


class GatedDevice(MemoryDevice):
    """Reads wait until ``gate`` is set; ``entered`` tells that one is waiting."""

    def __init__(self, size_bytes: int, *, name: str) -> None:
        super().__init__(size_bytes, name=name)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def read_at(self, offset: int, length: int) -> bytes:
        self.entered.set()
        await self.gate.wait()
        return await super().read_at(offset, length)


class FailingDevice(MemoryDevice):
    """Reads and/or writes fail like a broken disk."""

    def __init__(self, size_bytes: int, *, name: str, reads: bool, writes: bool) -> None:
        super().__init__(size_bytes, name=name)
        self.fail_reads = reads
        self.fail_writes = writes

    async def read_at(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            raise DeviceError("media error", device=self.name)
        return await super().read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        if self.fail_writes:
            raise DeviceError("media error", device=self.name)
        await super().write_at(offset, data)


async def test_files_have_device_sizes_and_pread_pwrite_reach_devices(mountpoint: Path) -> None:
    memory = MemoryDevice(4 * MiB, name="memory")
    odd = MemoryDevice(MiB + 1234, name="odd")  # not a page multiple
    initial = pattern(4 * MiB)
    await memory.write_at(0, initial)
    async with FuseMount(mountpoint, {"memory": memory, "odd": odd}) as m:
        out = await run_py_ok(
            """
            import json, os, sys
            mnt = sys.argv[1]
            names = sorted(os.listdir(mnt))
            sizes = {n: os.stat(os.path.join(mnt, n)).st_size for n in names}
            fd = os.open(os.path.join(mnt, "memory"), os.O_RDWR)
            head = os.pread(fd, 64, 0).hex()
            tail = os.pread(fd, 100, 4 * 2**20 - 50).hex()  # clamped at EOF
            os.pwrite(fd, b"hello ferry", 3 * 2**20 + 5)
            os.fsync(fd)
            os.close(fd)
            fd = os.open(os.path.join(mnt, "odd"), os.O_RDWR)
            os.pwrite(fd, b"end", 2**20 + 1231)
            os.fsync(fd)
            os.close(fd)
            print(json.dumps({"names": names, "sizes": sizes, "head": head, "tail": tail}))
            """,
            str(mountpoint),
        )
        result = json.loads(out)
        assert result["names"] == ["memory", "odd"]
        assert result["sizes"] == {"memory": 4 * MiB, "odd": MiB + 1234}
        assert bytes.fromhex(result["head"]) == initial[:64]
        assert bytes.fromhex(result["tail"]) == initial[-50:]
        assert await memory.read_at(3 * MiB + 5, 11) == b"hello ferry"
        assert await memory.read_at(3 * MiB, 5) == initial[3 * MiB : 3 * MiB + 5]
        assert await odd.read_at(MiB + 1231, 3) == b"end"
        assert m.counters("memory").fsyncs == 1
    assert find_mount(mountpoint) is None


async def test_the_file_set_and_sizes_are_fixed(mountpoint: Path) -> None:
    async with FuseMount(mountpoint, {"memory": MemoryDevice(MiB)}):
        out = await run_py_ok(
            """
            import json, os, sys
            mnt = sys.argv[1]
            def errno_of(fn):
                try:
                    fn()
                except OSError as e:
                    return e.errno
                return 0
            path = os.path.join(mnt, "memory")
            print(json.dumps({
                "truncate": errno_of(lambda: os.truncate(path, 4096)),
                "same_size_truncate": errno_of(lambda: os.truncate(path, 2**20)),
                "create": errno_of(lambda: open(os.path.join(mnt, "new"), "w")),
                "unlink": errno_of(lambda: os.unlink(path)),
                "rename": errno_of(lambda: os.rename(path, os.path.join(mnt, "x"))),
                "size": os.stat(path).st_size,
            }))
            """,
            str(mountpoint),
        )
    result = json.loads(out)
    assert result["truncate"] == errno.EPERM
    assert result["same_size_truncate"] == 0  # QEMU does this to its RAM file
    assert result["create"] == errno.EPERM
    assert result["unlink"] == errno.EPERM
    assert result["rename"] == errno.EPERM
    assert result["size"] == MiB


async def test_map_shared_writes_reach_the_device_after_flush(mountpoint: Path) -> None:
    memory = MemoryDevice(8 * MiB, name="memory")
    data = pattern(3 * MiB, seed=7)
    async with FuseMount(mountpoint, {"memory": memory}) as m:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(
                """
                import mmap, os, sys
                fd = os.open(sys.argv[1], os.O_RDWR)
                mem = mmap.mmap(fd, 8 * 2**20, mmap.MAP_SHARED)
                data = sys.stdin.buffer.read(3 * 2**20)
                mem[2**20 : 4 * 2**20] = data
                print("written", flush=True)
                sys.stdin.readline()  # keep the mapping and fd open until flushed
                """),
            str(m.path("memory")),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(data)
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"written\n"
            stats = await m.flush("memory")
            # The writer has neither msynced nor closed: only flush() moved the pages.
            assert await memory.read_at(MiB, 3 * MiB) == data
            assert await memory.read_at(0, MiB) == bytes(MiB)
            assert stats.name == "memory"
            assert stats.duration_s > 0
            assert m.counters("memory").bytes_written >= 3 * MiB
            again = await m.flush("memory")
            assert again.bytes_written == 0  # nothing dirty any more
            proc.stdin.write(b"\n")
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.wait(), 60) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_cold_reads_wait_for_remote_data(mountpoint: Path) -> None:
    size = 2 * MiB
    block = 64 * 1024
    source = pattern(size, seed=3)
    needed: list[int] = []
    async with asyncio.TaskGroup() as tg:

        async def deliver(b: int) -> None:
            await asyncio.sleep(0.01)  # the "network"
            await remote.write_at(b * block, source[b * block : (b + 1) * block])

        def on_need(b: int) -> None:
            needed.append(b)
            tg.create_task(deliver(b))

        local, remote = waiting_cache(MemoryDevice(size, name="memory"), block, on_need=on_need)
        async with FuseMount(mountpoint, {"memory": local}) as m:
            out = await run_py_ok(
                """
                import hashlib, sys
                with open(sys.argv[1], "rb") as f:
                    print(hashlib.sha256(f.read()).hexdigest())
                """,
                str(m.path("memory")),
            )
    assert out.strip() == hashlib.sha256(source).hexdigest()
    assert sorted(set(needed)) == list(range(size // block))
    assert len(needed) == len(set(needed))  # each absent block asked for once


async def test_a_waiting_read_does_not_block_other_requests(mountpoint: Path) -> None:
    slow = GatedDevice(MiB, name="slow")
    await slow.write_at(0, b"S" * MiB)
    fast = MemoryDevice(MiB, name="fast")
    await fast.write_at(0, b"F" * MiB)
    read_one = """
        import sys
        with open(sys.argv[1], "rb") as f:
            print(f.read(16).decode())
        """
    async with FuseMount(mountpoint, {"slow": slow, "fast": fast}) as m:
        slow_reader = asyncio.create_task(run_py(read_one, str(m.path("slow"))))
        try:
            await asyncio.wait_for(slow.entered.wait(), 60)
            assert (await run_py_ok(read_one, str(m.path("fast")))).strip() == "F" * 16
            assert not slow_reader.done()
            slow.gate.set()
            rc, out, err = await slow_reader
            assert rc == 0, err
            assert out.strip() == "S" * 16
        finally:
            slow.gate.set()
            if not slow_reader.done():
                slow_reader.cancel()


async def test_unmount_fails_a_read_stuck_forever(mountpoint: Path) -> None:
    stuck = GatedDevice(MiB, name="stuck")
    probe = """
        import sys
        try:
            open(sys.argv[1], "rb").read(16)
        except OSError as e:
            print(e.errno)
        else:
            print("ok")
        """
    async with FuseMount(mountpoint, {"stuck": stuck}) as m:
        reader = asyncio.create_task(run_py(probe, str(m.path("stuck"))))
        await asyncio.wait_for(stuck.entered.wait(), 60)
    rc, out, err = await asyncio.wait_for(reader, 60)
    assert rc == 0, err
    assert int(out) in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)
    assert find_mount(mountpoint) is None


async def test_device_errors_become_eio_and_flush_errors(mountpoint: Path) -> None:
    devices = {
        "bad": FailingDevice(MiB, name="bad", reads=True, writes=False),
        "badwrite": FailingDevice(MiB, name="badwrite", reads=False, writes=True),
    }
    async with FuseMount(mountpoint, devices) as m:
        out = await run_py_ok(
            """
            import os, sys
            fd = os.open(sys.argv[1], os.O_RDONLY)
            try:
                os.pread(fd, 4096, 0)
            except OSError as e:
                print(e.errno)
            """,
            str(m.path("bad")),
        )
        assert int(out) == errno.EIO
        # A writer dirties a page and keeps it mapped; the failed writeback
        # happens inside flush() and must be reported there.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(
                """
                import mmap, os, sys
                fd = os.open(sys.argv[1], os.O_RDWR)
                mem = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
                mem[0:4] = b"boom"
                print("written", flush=True)
                sys.stdin.readline()
                """),
            str(m.path("badwrite")),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"written\n"
            with pytest.raises(FlushError):
                await m.flush("badwrite")
        finally:
            proc.kill()
            await proc.wait()


async def test_unmounts_when_the_body_raises_and_frees_the_session(mountpoint: Path) -> None:
    class Boom(Exception):
        pass

    async def body() -> None:
        async with FuseMount(mountpoint, {"memory": MemoryDevice(MiB)}):
            assert find_mount(mountpoint) is not None
            raise Boom

    with pytest.raises(Boom):
        await body()
    assert find_mount(mountpoint) is None
    async with FuseMount(mountpoint, {"memory": MemoryDevice(MiB)}):
        assert find_mount(mountpoint) is not None
    assert find_mount(mountpoint) is None


async def test_a_second_mount_in_the_same_process_is_refused(
    mountpoint: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    async with FuseMount(mountpoint, {"memory": MemoryDevice(MiB)}) as m:
        with pytest.raises(SessionBusyError):
            async with FuseMount(other, {"memory": MemoryDevice(MiB)}):
                pass
        assert find_mount(other) is None
        out = await run_py_ok("import os,sys; print(os.stat(sys.argv[1]).st_size)",
                              str(m.path("memory")))
        assert int(out) == MiB


MOUNT_IN_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from ferry.expose.fuse import FuseMount
from ferry.storage.providers.memory import MemoryDevice

async def main():
    async with FuseMount(sys.argv[1], {"memory": MemoryDevice(2**20)}):
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture
async def child_mount(mountpoint: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A ferry mount served by another process (killed at the end)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MOUNT_IN_CHILD, str(mountpoint), SRC,
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_stale_mount_from_a_killed_daemon_is_replaced(
    mountpoint: Path, child_mount: asyncio.subprocess.Process
) -> None:
    # While the other daemon lives, its mount is not ours to take.
    with pytest.raises(MountError, match="live"):
        async with FuseMount(mountpoint, {"memory": MemoryDevice(MiB)}):
            pass
    child_mount.send_signal(signal.SIGKILL)
    await child_mount.wait()
    assert find_mount(mountpoint) is not None  # left behind
    with pytest.raises(OSError, match="not connected") as info:
        await asyncio.to_thread(os.statvfs, mountpoint)
    assert info.value.errno == errno.ENOTCONN

    memory = MemoryDevice(2 * MiB)
    await memory.write_at(0, b"fresh")
    async with FuseMount(mountpoint, {"memory": memory}) as m:
        out = await run_py_ok("import sys; print(open(sys.argv[1], 'rb').read(5).decode())",
                              str(m.path("memory")))
        assert out.strip() == "fresh"
    assert find_mount(mountpoint) is None


async def test_bdi_limits_are_tuned_while_mounted(mountpoint: Path) -> None:
    async with FuseMount(mountpoint, {"memory": MemoryDevice(MiB)}) as m:
        assert m.bdi_dir is not None
        values = read_values(m.bdi_dir)
        assert values["strict_limit"] == "0"
        assert values["max_ratio"] == "100"
        assert values["read_ahead_kb"] == "128"  # left alone


async def test_bdi_tuner_restores_the_kernel_defaults(mountpoint: Path) -> None:
    async with FuseMount(mountpoint, {"memory": MemoryDevice(MiB)}, bdi=NO_TUNING) as m:
        assert m.bdi_dir is None
        entry = find_mount(mountpoint)
        assert entry is not None
        directory = bdi_dir(entry.dev)
        before = read_values(directory)
        assert before["strict_limit"] == "1"  # the kernel's FUSE default
        tuner = BdiTuner(directory)
        tuner.apply(BdiTuning(max_ratio_percent=None, max_bytes=512 * MiB, read_ahead_kb=512))
        during = read_values(directory)
        assert during["strict_limit"] == "0"
        assert during["read_ahead_kb"] == "512"
        assert during["max_bytes"] != before["max_bytes"]
        tuner.restore()
        assert read_values(directory) == before
