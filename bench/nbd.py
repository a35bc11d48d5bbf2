"""Benchmark ferry's NBD server against nbdkit with the same clients.

One run serves the same image file (on /dev/shm, so the disk is not what is
measured) over a UNIX socket, first by ferry (``FileDevice`` behind
``NBDServer``, in its own process) and then by ``nbdkit file``, and drives
both with identical clients:

* sequential read and write: ``nbdcopy`` with 1 MiB requests, one
  connection, extents off (so neither server can skip data);
* 4 KiB reads: ``qemu-img bench`` with 4 KiB requests, queue depth 16 and a
  stride of a prime number of 4 KiB blocks; qemu-img bench wraps offsets at
  the end of the image, so the stride visits the blocks in a scattered order
  that defeats read-ahead.

With ``--rounds N`` the two servers take turns N times (ferry, nbdkit,
ferry, ...) and every figure is the median over the rounds; each ratio is
the median of the per-round ratios, so a burst of load from other work on a
shared machine skews one round, not the result.

Usage: ``python bench/nbd.py [--size-mib N] [--rounds N] [--json]``. Needs
nbdkit, libnbd-bin (nbdcopy) and qemu-utils.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_MIB = 1024 * 1024
_STRIDE_BLOCKS = 7919  # prime: the stride is coprime with any power-of-two block count


def _serve_ferry(sock: str, image: str) -> None:
    """Child-process entry: serve ``image`` as export "disk" until killed."""
    from ferry.expose.nbd.server import Export, NBDServer
    from ferry.storage.providers.file import FileDevice

    async def main() -> None:
        device = FileDevice(image)
        try:
            async with NBDServer({"disk": Export(device)}).serve_unix(sock):
                await asyncio.Event().wait()
        finally:
            await device.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@contextlib.contextmanager
def _server(kind: str, sock: str, image: str) -> Iterator[str]:
    """Start a server process; yield the export's URI; always stop it."""
    if kind == "ferry":
        argv = [sys.executable, __file__, "--serve", sock, image]
        export = "disk"
    else:
        argv = ["nbdkit", "--exit-with-parent", "--foreground", "--unix", sock, "file", image]
        export = ""
    # stderr muted: the readiness probe makes nbdkit log a broken handshake.
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL if kind == "nbdkit" else None)
    try:
        deadline = time.monotonic() + 30
        while not _accepting(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///{export}?socket={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def _accepting(sock: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(sock)
        except OSError:
            return False
    return True


def _timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _nbdcopy(src: str, dst: str) -> list[str]:
    return [
        "nbdcopy",
        "--no-extents",
        "--request-size=1048576",
        "--connections=1",
        src,
        dst,
    ]


def _measure(uri: str, source: str, size_bytes: int) -> dict[str, float]:
    mib = size_bytes / _MIB
    # Warm once so both servers start with the file in page cache.
    _timed(_nbdcopy(uri, "null:"))
    read_s = min(_timed(_nbdcopy(uri, "null:")) for _ in range(2))
    write_s = min(_timed(_nbdcopy(source, uri)) for _ in range(2))
    count = 50_000
    stride = _STRIDE_BLOCKS * 4096
    bench = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", "16"]
    rand_s = min(_timed([*bench, "-s", "4096", "-S", str(stride), uri]) for _ in range(2))
    return {
        "seq_read_mib_s": mib / read_s,
        "seq_write_mib_s": mib / write_s,
        "rand4k_read_iops": count / rand_s,
    }


_RATIOS = (
    ("seq_read_mib_s", "seq_read_ratio"),
    ("seq_write_mib_s", "seq_write_ratio"),
    ("rand4k_read_iops", "rand4k_ratio"),
)


def run(size_mib: int, rounds: int = 1) -> dict[str, float | int]:
    for tool in ("nbdkit", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    size = size_mib * _MIB
    base = Path(tempfile.mkdtemp(prefix="ferry-nbd-bench-", dir="/dev/shm"))
    try:
        image, source = base / "image.raw", base / "source.raw"
        chunk = os.urandom(64 * _MIB)
        for path in (image, source):
            with path.open("wb") as f:
                for pos in range(0, size, len(chunk)):
                    f.write(chunk[: min(len(chunk), size - pos)])
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            measured: dict[str, float] = {}
            for kind, prefix in (("ferry", ""), ("nbdkit", "nbdkit_")):
                with _server(kind, str(base / f"{kind}.sock"), str(image)) as uri:
                    for key, value in _measure(uri, str(source), size).items():
                        measured[prefix + key] = value
            for key, ratio in _RATIOS:
                measured[ratio] = measured[key] / measured["nbdkit_" + key]
            for key, value in measured.items():
                samples.setdefault(key, []).append(value)
        results: dict[str, float | int] = {"size_mib": size_mib, "rounds": rounds}
        for key, values in samples.items():
            results[key] = round(statistics.median(values), 3 if key.endswith("ratio") else 1)
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate the servers N times, report medians"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", nargs=2, metavar=("SOCK", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve_ferry(*args.serve)
        return
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    results = run(args.size_mib, args.rounds)
    if args.json:
        print(json.dumps(results))
        return
    print(
        f"image {args.size_mib} MiB on /dev/shm, UNIX socket, same clients for both servers, "
        f"median of {args.rounds} round(s)"
    )
    rows = (
        ("sequential read (nbdcopy, 1 MiB)", "seq_read_mib_s", "MiB/s", "seq_read_ratio"),
        ("sequential write (nbdcopy, 1 MiB)", "seq_write_mib_s", "MiB/s", "seq_write_ratio"),
        ("4 KiB reads (qemu-img bench, QD16)", "rand4k_read_iops", "IOPS", "rand4k_ratio"),
    )
    for label, key, unit, ratio in rows:
        print(
            f"{label:38} ferry {results[key]:>10} {unit:6} nbdkit "
            f"{results['nbdkit_' + key]:>10} {unit:6} ratio {results[ratio]}"
        )


if __name__ == "__main__":
    main()
