"""Benchmark: guest-RAM-like I/O on a ferry FUSE mount against tmpfs.

For a memory file of ``--size-mib`` (default 1024) this measures, with the
I/O done by a separate process so the daemon's loop runs freely:

* cold sequential read (1 MiB ``readinto``) of a file whose pages are not in
  the page cache (a fresh mount has none), and of a tmpfs file;
* ``MAP_SHARED`` stores over the whole file (the guest dirtying its RAM),
  then a flush: :meth:`FuseMount.flush` for the mount, ``fsync`` for tmpfs.

The FUSE part runs twice: with ferry's bdi tuning and with the kernel's
default per-mount writeback limits, to show what the tuning buys.

    .venv/bin/python bench/fuse.py --size-mib 256 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from ferry.expose.fuse import NO_TUNING, BdiTuning, FuseMount
from ferry.storage.providers.memory import MemoryDevice

MiB = 1 << 20

READ_CHILD = """
import json, os, sys, time
buf = bytearray(2**20)
fd = os.open(sys.argv[1], os.O_RDONLY)
start = time.perf_counter()
total = 0
while True:
    n = os.readv(fd, [buf])
    if not n:
        break
    total += n
elapsed = time.perf_counter() - start
os.close(fd)
print(json.dumps({"bytes": total, "seconds": elapsed}), flush=True)
"""

MMAP_CHILD = """
import json, mmap, os, sys, time
size = int(sys.argv[2])
fd = os.open(sys.argv[1], os.O_RDWR)
mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
chunk = bytes(range(256)) * 4096
start = time.perf_counter()
for off in range(0, size, len(chunk)):
    mem[off:off + len(chunk)] = chunk[: size - off]
written = time.perf_counter() - start
fsync_s = None
if sys.argv[3] == "fsync":
    start = time.perf_counter()
    os.fsync(fd)
    fsync_s = time.perf_counter() - start
print(json.dumps({"write_seconds": written, "fsync_seconds": fsync_s}), flush=True)
sys.stdin.readline()  # hold the mapping until the parent has flushed
"""


async def _child(code: str, *args: str) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(code), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line:
        await proc.wait()
        raise RuntimeError(f"benchmark child failed ({proc.returncode})")
    return proc, json.loads(line)


async def _finish(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"\n")
    await proc.stdin.drain()
    await proc.wait()


async def bench_tmpfs(size: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="ferry-bench-") as f:
        os.ftruncate(f.fileno(), size)
        proc, w = await _child(MMAP_CHILD, f.name, str(size), "fsync")
        await _finish(proc)
        proc, r = await _child(READ_CHILD, f.name)
        await proc.wait()
    return {
        "tmpfs_cold_read_mib_s": r["bytes"] / MiB / r["seconds"],
        "tmpfs_write_mib_s": size / MiB / w["write_seconds"],
        "tmpfs_flush_mib_s": size / MiB / max(w["fsync_seconds"], 1e-9),
    }


async def bench_fuse(size: int, mountpoint: Path, tuning: BdiTuning) -> dict[str, float]:
    device = MemoryDevice(size, name="memory")
    fill = bytes(range(256)) * 4096
    for off in range(0, size, len(fill)):
        await device.write_at(off, fill[: size - off])
    async with FuseMount(mountpoint, {"memory": device}, bdi=tuning) as m:
        path = str(m.path("memory"))
        proc, r = await _child(READ_CHILD, path)  # a fresh mount: nothing cached
        await proc.wait()
        before = m.counters("memory").bytes_written
        proc, w = await _child(MMAP_CHILD, path, str(size), "none")
        during_write = m.counters("memory").bytes_written - before
        stats = await m.flush("memory")
        await _finish(proc)
        largest = m.counters("memory").largest_write_bytes
    flushed_mib = stats.bytes_written / MiB
    return {
        "cold_read_mib_s": r["bytes"] / MiB / r["seconds"],
        "write_mib_s": size / MiB / w["write_seconds"],
        "written_back_during_write_mib": during_write / MiB,
        "flushed_mib": flushed_mib,
        "flush_s": stats.duration_s,
        "flush_mib_s": flushed_mib / stats.duration_s if stats.duration_s else 0.0,
        "flush_ms_per_mib": stats.duration_s * 1e3 / flushed_mib if flushed_mib else 0.0,
        "largest_write_kib": largest / 1024,
    }


async def run(size_mib: int) -> dict[str, Any]:
    size = size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        # The first mount of a run reads slower (page cache and heap warm-up);
        # run the untuned baseline first so the tuned figures are not penalised.
        untuned = await bench_fuse(size, mnt, NO_TUNING)
        tuned = await bench_fuse(size, mnt, BdiTuning())
    tmpfs = await bench_tmpfs(size)
    result: dict[str, Any] = {"size_mib": size_mib, **tuned, **tmpfs}
    result["read_ratio"] = tuned["cold_read_mib_s"] / tmpfs["tmpfs_cold_read_mib_s"]
    result["flush_ratio"] = tuned["flush_mib_s"] / tmpfs["tmpfs_flush_mib_s"]
    result["untuned"] = untuned
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    start = time.monotonic()
    result = asyncio.run(run(args.size_mib))
    result["bench_seconds"] = time.monotonic() - start
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        for key, value in result.items():
            sys.stdout.write(f"{key:32} {value}\n")


if __name__ == "__main__":
    main()
