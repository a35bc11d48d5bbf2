"""ferry's NBD server against the real clients QEMU users run: qemu-img,
qemu-io, nbdinfo and nbdcopy, over a UNIX socket, and over TCP with TLS
(NBD_OPT_STARTTLS, mutual certificates from ferry's own CA helpers).

The server serves in the test's own event loop; the clients run as
subprocesses started with ``asyncio.create_subprocess_exec``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.expose.nbd.server import Export, NBDServer
from ferry.storage.providers.file import FileDevice
from ferry.transport.certs import HostCertFiles, create_ca, create_host_cert
from ferry.transport.tls import server_context_for

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


# --- TLS over TCP: QEMU's and libnbd's gnutls clients --------------------------


@dataclass
class TLSServed:
    port: int
    dir: Path
    disk_path: Path
    creds: Path
    """QEMU/libnbd client credentials: ca-cert.pem, client-cert.pem, client-key.pem."""
    rogue_creds: Path
    """The same files, but the client certificate is from another CA."""

    def image_opts(self, export: str, *, tls: bool = True) -> str:
        opts = (
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
            f"server.port={self.port},export={export}"
        )
        return opts + (",tls-creds=tls0" if tls else "")

    def nbds_uri(self, export: str) -> str:
        return f"nbds://127.0.0.1:{self.port}/{export}?tls-certificates={self.creds}"


def qemu_client_creds(files: HostCertFiles, ca_paths: list[Path], directory: Path) -> Path:
    """Copy ferry's host certificate files under the names QEMU and libnbd look for.

    ``ca-cert.pem`` holds every CA of ``ca_paths``: QEMU checks its own
    certificate against it before connecting, as well as the server's.
    """
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(b"".join(p.read_bytes() for p in ca_paths))
    shutil.copyfile(files.cert_path, directory / "client-cert.pem")
    shutil.copyfile(files.key_path, directory / "client-key.pem")
    return directory


def tls_object(creds: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]


async def run_failing(*argv: str) -> str:
    """Run a client expected to fail; return its output."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode != 0, f"{argv[0]} unexpectedly succeeded: {out.decode()}"
    return out.decode()


@pytest.fixture
async def tls_served() -> AsyncIterator[TLSServed]:
    base = Path(tempfile.mkdtemp(prefix="ferry-nbd-tls-e2e-", dir="/tmp"))
    try:
        create_ca(base / "ca")
        create_ca(base / "rogue-ca", name="rogue-ca")
        # QEMU checks the server certificate against the host it dialled, here
        # an IP address, so the certificate must name 127.0.0.1.
        server_files = create_host_cert(
            base / "ca", base / "server", "nbd-server", ips=["127.0.0.1"]
        )
        client_files = create_host_cert(base / "ca", base / "client", "qemu-client")
        rogue_files = create_host_cert(base / "rogue-ca", base / "rogue", "qemu-client")
        creds = qemu_client_creds(client_files, [base / "ca" / "ca.pem"], base / "creds")
        # The rogue client trusts our CA as well as its own, so QEMU accepts
        # its own certificate and our server's: it is our server that refuses.
        rogue_creds = qemu_client_creds(
            rogue_files,
            [base / "ca" / "ca.pem", base / "rogue-ca" / "ca.pem"],
            base / "rogue-creds",
        )
        disk_path = base / "disk.img"
        disk = FileDevice(disk_path, size_bytes=SIZE, create=True)
        server = NBDServer({"disk": Export(disk)})
        try:
            async with server.serve_tcp(ssl_context=server_context_for(server_files)) as (_, port):
                yield TLSServed(port, base, disk_path, creds, rogue_creds)
        finally:
            await disk.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_qemu_over_tls(tls_served: TLSServed) -> None:
    opts = tls_served.image_opts("disk")
    creds = tls_object(tls_served.creds)
    info = json.loads(await run("qemu-img", "info", "--output=json", *creds, "--image-opts", opts))
    assert info["virtual-size"] == SIZE
    await run(
        "qemu-io",
        *creds,
        "--image-opts",
        opts,
        "-c",
        "write -P 0x3c 0 1M",
        "-c",
        "read -P 0x3c 0 1M",
        "-c",
        "flush",
    )
    assert tls_served.disk_path.read_bytes()[: 1 << 20] == b"\x3c" * (1 << 20)
    # Bulk both ways: large reads here cannot use sendfile, they go through TLS.
    src = tls_served.dir / "src.img"
    data = random_image(src, SIZE)
    await run(
        "qemu-img", "convert", "-n", *creds, "-f", "raw", "--target-image-opts", str(src), opts
    )
    assert tls_served.disk_path.read_bytes() == data
    out = tls_served.dir / "out.img"
    await run("qemu-img", "convert", *creds, "--image-opts", opts, "-O", "raw", str(out))
    assert out.read_bytes() == data


async def test_libnbd_over_tls(tls_served: TLSServed) -> None:
    src = tls_served.dir / "src.img"
    data = random_image(src, SIZE)
    await run("nbdcopy", "--connections=2", "--flush", str(src), tls_served.nbds_uri("disk"))
    assert tls_served.disk_path.read_bytes() == data
    details = json.loads(await run("nbdinfo", "--json", tls_served.nbds_uri("disk")))
    assert details["TLS"] is True
    assert details["exports"][0]["export-size"] == SIZE


async def test_plaintext_qemu_is_refused_and_server_keeps_serving(tls_served: TLSServed) -> None:
    out = await run_failing(
        "qemu-img", "info", "--image-opts", tls_served.image_opts("disk", tls=False)
    )
    assert "TLS" in out
    # The URI form ends option haggling with NBD_OPT_EXPORT_NAME on old
    # clients; any plaintext attempt must fail the same way.
    await run_failing(
        "qemu-io", "-f", "raw", "-c", "read 0 4k", f"nbd://127.0.0.1:{tls_served.port}/disk"
    )
    info = json.loads(
        await run(
            "qemu-img",
            "info",
            "--output=json",
            *tls_object(tls_served.creds),
            "--image-opts",
            tls_served.image_opts("disk"),
        )
    )
    assert info["virtual-size"] == SIZE


async def test_client_certificate_from_another_ca_is_refused(
    tls_served: TLSServed, caplog: pytest.LogCaptureFixture
) -> None:
    tls_served.disk_path.write_bytes(bytes(SIZE))
    with caplog.at_level(logging.INFO, logger="ferry.expose.nbd.server"):
        out = await run_failing(
            "qemu-io",
            *tls_object(tls_served.rogue_creds),
            "--image-opts",
            tls_served.image_opts("disk"),
            "-c",
            "write -P 0x77 0 4k",
        )
    assert "wrote" not in out
    # Refused by our server during the handshake, not by QEMU beforehand.
    assert "TLS handshake failed: certificate verify failed" in caplog.text
    assert tls_served.disk_path.read_bytes()[:4096] == bytes(4096)
    # Still serving the right clients.
    await run(
        "qemu-io",
        *tls_object(tls_served.creds),
        "--image-opts",
        tls_served.image_opts("disk"),
        "-c",
        "write -P 0x77 0 4k",
    )
    assert tls_served.disk_path.read_bytes()[:4096] == b"\x77" * 4096
