"""ferry's NBD server against the real clients QEMU users run: qemu-img,
qemu-io, nbdinfo and nbdcopy, over a UNIX socket.

The server serves in the test's own event loop; the clients run as
subprocesses started with ``asyncio.create_subprocess_exec``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.expose.nbd.server import Export, NBDServer
from ferry.storage.providers.file import FileDevice

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")),
        reason="needs qemu-utils and libnbd-bin",
    ),
]

SIZE = 8 << 20
RO_SIZE = 1 << 20


@dataclass
class Served:
    sock: str
    dir: Path
    disk: FileDevice
    disk_path: Path
    ro_path: Path

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {err.decode()}"
    return out.decode()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    base = Path(tempfile.mkdtemp(prefix="ferry-nbd-e2e-", dir="/tmp"))
    try:
        disk_path, ro_path = base / "disk.img", base / "ro.img"
        ro_path.write_bytes(bytes(range(256)) * (RO_SIZE // 256))
        disk = FileDevice(disk_path, size_bytes=SIZE, create=True)
        ro = FileDevice(ro_path, read_only=True)
        server = NBDServer(
            {
                "disk": Export(disk, description="scratch disk", block_size_bytes=65536),
                "ro": Export(ro, read_only=True, description="golden image"),
            }
        )
        try:
            async with server.serve_unix(base / "nbd.sock") as sock:
                yield Served(sock, base, disk, disk_path, ro_path)
        finally:
            await disk.close()
            await ro.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def qemu_io(uri: str, *commands: str) -> str:
    return await run("qemu-io", "-f", "raw", *(a for c in commands for a in ("-c", c)), uri)


def random_image(path: Path, size: int) -> bytes:
    data = os.urandom(size // 2) + bytes(size // 4) + os.urandom(size // 4)
    path.write_bytes(data)
    return data


async def test_qemu_img_info(served: Served) -> None:
    info = json.loads(await run("qemu-img", "info", "--output=json", served.uri("disk")))
    assert info["virtual-size"] == SIZE
    info = json.loads(
        await run(
            "qemu-img",
            "info",
            "--output=json",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={served.sock},export=ro",
        )
    )
    assert info["virtual-size"] == RO_SIZE


async def test_qemu_img_convert_in_and_out(served: Served) -> None:
    src = served.dir / "src.img"
    data = random_image(src, SIZE)
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri("disk"))
    assert served.disk_path.read_bytes() == data
    out = served.dir / "out.img"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("disk"), str(out))
    assert out.read_bytes() == data
    # And the read-only export, whose file we wrote ourselves.
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("ro"), str(out))
    assert out.read_bytes() == served.ro_path.read_bytes()


async def test_qemu_io_commands(served: Served) -> None:
    await qemu_io(
        served.uri("disk"),
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -f -P 0xcd 1M 64k",  # -f: FUA
        "flush",
        "write -z 2M 512k",
        "read -P 0 2M 512k",
        "discard 3M 64k",
        "aio_write -P 0x11 4M 4k",
        "aio_write -P 0x22 5M 4k",
        "aio_flush",
    )
    on_disk = served.disk_path.read_bytes()
    assert on_disk[: 1 << 20] == b"\xab" * (1 << 20)
    assert on_disk[1 << 20 : (1 << 20) + 65536] == b"\xcd" * 65536
    assert on_disk[2 << 20 : (2 << 20) + (512 << 10)] == bytes(512 << 10)
    assert on_disk[4 << 20 : (4 << 20) + 4096] == b"\x11" * 4096
    assert on_disk[5 << 20 : (5 << 20) + 4096] == b"\x22" * 4096


async def test_qemu_io_write_to_read_only_fails(served: Served) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 1 0 4k",
        served.uri("ro"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert b"write failed" in out or b"read-only" in out.lower() or proc.returncode != 0
    assert served.ro_path.read_bytes()[:4096] == bytes(range(256)) * 16


async def test_nbdinfo_list_and_details(served: Served) -> None:
    listing = json.loads(
        await run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={served.sock}")
    )
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"disk", "ro"}
    assert exports["disk"]["description"] == "scratch disk"
    assert exports["ro"]["description"] == "golden image"
    assert exports["ro"]["is_read_only"] is True

    details = json.loads(await run("nbdinfo", "--json", served.uri("disk")))
    disk = details["exports"][0]
    assert disk["export-size"] == SIZE
    assert disk["block_size_minimum"] == 1
    assert disk["block_size_preferred"] == 65536
    assert disk["block_size_maximum"] == 32 << 20
    assert disk["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
        assert disk[flag] is True, flag
    assert details["protocol"] == "newstyle-fixed"
    assert (await run("nbdinfo", "--size", served.uri("ro"))).strip() == str(RO_SIZE)


@pytest.mark.parametrize("connections", [1, 4])
async def test_nbdcopy_both_ways(served: Served, connections: int) -> None:
    src = served.dir / "src.img"
    data = random_image(src, SIZE)
    conns = f"--connections={connections}"
    await run("nbdcopy", conns, "--flush", str(src), served.uri("disk"))
    assert served.disk_path.read_bytes() == data
    out = served.dir / "out.img"
    await run("nbdcopy", conns, served.uri("disk"), str(out))
    assert out.read_bytes() == data


async def test_two_qemu_io_at_once(served: Served) -> None:
    await asyncio.gather(
        qemu_io(served.uri("disk"), "write -P 0x5a 0 2M", "flush"),
        qemu_io(served.uri("disk"), "write -P 0xa5 4M 2M", "flush"),
    )
    await asyncio.gather(
        qemu_io(served.uri("disk"), "read -P 0x5a 0 2M"),
        qemu_io(served.uri("disk"), "read -P 0xa5 4M 2M"),
    )
    on_disk = served.disk_path.read_bytes()
    assert on_disk[: 2 << 20] == b"\x5a" * (2 << 20)
    assert on_disk[4 << 20 : 6 << 20] == b"\xa5" * (2 << 20)
