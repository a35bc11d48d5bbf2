#!/usr/bin/env python3
"""Benchmark: migrate a device over loopback TCP and UNIX sockets against a plain socket copy.

Runs, in one invocation and on the same machine state:

1. ``raw``: a plain Python TCP copy of the same number of bytes (blocking
   sockets, 1 MiB ``sendall`` into ``recv_into`` a preallocated buffer), the
   baseline;
2. ``tcp`` / ``unix``: a full ferry migration of a device of random
   (incompressible) data, from the source in this process to a receiver in
   a child process, through the codec, hashing, verification at the
   destination and completion handshake;
   ``tls``: the same over TCP with mutual TLS (``ferry certs``' certificates),
   as between two hosts; ``ratio_tls`` is its rate over the same ``raw`` copy;
3. ``dirty``: the same over TCP while a writer changes the source with random
   4 KiB writes at ``--write-rate-mib-s`` (default 50), default dirty policy.
   Reports ``amplification`` (every byte sent, all phases, / the device's
   size: 1.0 is a single copy) and ``stop_reason``, why the dirty cycles ended.

Each transfer runs ``--repeat`` times; the median is reported. Usage:

    bench/storage_migrate.py --size-mib 1024 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import xxhash

from ferry.migration.channel import StreamChannel
from ferry.migration.destination import DestinationDevice, Receiver
from ferry.migration.policy import DirtyPolicy, StopReason
from ferry.migration.source import MigrationHooks, Migrator
from ferry.migration.stacks import DestinationStack, SourceStack, destination_stack, source_stack
from ferry.protocol.messages import DeviceInfo
from ferry.storage.providers.memory import MemoryDevice
from ferry.transport.auth import (
    HANDSHAKE_TIMEOUT_S,
    accept_authenticated,
    new_token,
    present_token,
    same_user,
    token_authenticator,
)
from ferry.transport.certs import HostCertFiles, create_ca, create_host_cert
from ferry.transport.listener import Listener
from ferry.transport.tcp import connect_tcp, listen_tcp
from ferry.transport.tls import client_context_for, server_context_for
from ferry.transport.unix import connect_unix, listen_unix

MIB = 1024 * 1024
CHUNK = MIB


# -- baseline ------------------------------------------------------------------------------


def _raw_receiver(size: int, conn: Connection) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conn.send(srv.getsockname()[1])
    c, _ = srv.accept()
    # Allocated after accept, inside the timed copy, as ferry's destination
    # allocates its device when the source's Hello arrives.
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = c.recv_into(view[got:], min(CHUNK, size - got))
        if not n:
            break
        got += n
    c.sendall(b"k")
    conn.send(xxhash.xxh3_128_hexdigest(buf))
    c.close()
    srv.close()


def raw_copy(data: bytes) -> tuple[float, bool]:
    parent, child = mp.Pipe()
    proc = mp.Process(target=_raw_receiver, args=(len(data), child))
    proc.start()
    port = parent.recv()
    view = memoryview(data)
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        for off in range(0, len(data), CHUNK):
            s.sendall(view[off : off + CHUNK])
        s.recv(1)
        elapsed = time.perf_counter() - start
    ok = parent.recv() == xxhash.xxh3_128_hexdigest(data)
    proc.join()
    return elapsed, ok


# -- ferry migration -------------------------------------------------------------------------


def make_certs(directory: str) -> tuple[HostCertFiles, HostCertFiles]:
    """A private CA and two host certificates: (server on 127.0.0.1, client)."""
    create_ca(os.path.join(directory, "ca"))
    server = create_host_cert(os.path.join(directory, "ca"), os.path.join(directory, "server"),
                              "server", ips=["127.0.0.1"])
    client = create_host_cert(os.path.join(directory, "ca"), os.path.join(directory, "client"),
                              "client")
    return server, client


def _ferry_receiver(kind: str, where: str, token: str, conn: Connection,
                    certs: HostCertFiles | None = None) -> None:
    async def main() -> None:
        dests: list[DestinationStack] = []

        async def open_devices(infos: Sequence[DeviceInfo]) -> list[DestinationDevice]:
            for info in infos:
                dev = MemoryDevice(info.size_bytes, name=info.name)
                dests.append(destination_stack(info.name, dev, info.block_size_bytes))
            return [d.destination_device() for d in dests]

        listener: Listener[Any]
        if kind == "unix":
            listener = await listen_unix(where)
        else:
            context = server_context_for(certs) if kind == "tls" and certs else None
            listener = await listen_tcp("127.0.0.1", 0, ssl_context=context)
        async with listener:
            conn.send(listener.address)
            # Authenticated as `ferry receive`/`serve` are: a token on TCP, the peer's uid on
            # UNIX, the certificate (checked in the handshake) with TLS.
            if kind == "tcp":
                stream = await accept_authenticated(listener, token_authenticator(token))
            elif kind == "unix":
                stream = await accept_authenticated(listener, same_user)
            else:
                stream = await listener.accept()
        channel = StreamChannel(stream)
        await Receiver(channel, open_devices).run()
        await channel.aclose()
        d = dests[0]
        conn.send(xxhash.xxh3_128_hexdigest(await d.remote.read_at(0, d.remote.size_bytes)))

    asyncio.run(main())


async def ferry_migrate(
    stack: SourceStack,
    kind: str,
    *,
    write_rate_mib_s: float = 0.0,
    policy: DirtyPolicy | None = None,
    certs: tuple[HostCertFiles, HostCertFiles] | None = None,
) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="ferry-bench-")
    parent, child = mp.Pipe()
    token = new_token()
    proc = mp.Process(
        target=_ferry_receiver,
        args=(kind, os.path.join(tmp, "s"), token, child, certs[0] if certs else None),
    )
    proc.start()
    address = await asyncio.to_thread(parent.recv)
    stop = asyncio.Event()
    written = 0

    async def writer() -> None:
        nonlocal written
        rnd = random.Random(1)
        size = stack.local.size_bytes
        n = 4096
        interval = n / (write_rate_mib_s * MIB)
        next_at = time.monotonic()
        payload = os.urandom(1 << 20)
        while not stop.is_set():
            off = rnd.randrange(0, size - n) & ~4095
            p = rnd.randrange(0, len(payload) - n)
            await stack.local.write_at(off, payload[p : p + n])
            written += n
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif written % (64 * n) == 0:
                await asyncio.sleep(0)

    async def suspend() -> None:
        stop.set()

    start = time.perf_counter()
    if kind == "tls":
        assert certs is not None
        stream = await connect_tcp(*address, ssl_context=client_context_for(certs[1]))
    else:
        stream = await (connect_tcp(*address) if kind == "tcp" else connect_unix(address))
    if kind == "tcp":
        await present_token(stream, token, timeout_s=HANDSHAKE_TIMEOUT_S)
    channel = StreamChannel(stream)
    migrator = Migrator(
        [stack.source_device()],
        channel,
        policy=policy or DirtyPolicy(),
        hooks=MigrationHooks(suspend=suspend),
    )
    async with asyncio.TaskGroup() as tg:
        if write_rate_mib_s > 0:
            tg.create_task(writer())
        report = await migrator.run()
        stop.set()
    elapsed = time.perf_counter() - start
    await channel.aclose()
    source_digest = xxhash.xxh3_128_hexdigest(
        await stack.remote.read_at(0, stack.remote.size_bytes)
    )
    dest_digest = await asyncio.to_thread(parent.recv)
    await asyncio.to_thread(proc.join)
    await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
    return {
        "elapsed_s": elapsed,
        "identical": source_digest == dest_digest,
        "report": report,
        "written_mib": written / MIB,
    }


async def make_source(size: int) -> SourceStack:
    stack = source_stack("memory", MemoryDevice(size, name="memory"))
    rnd = random.Random(0)
    for off in range(0, size, 64 * MIB):
        n = min(64 * MIB, size - off)
        await stack.local.write_at(off, rnd.randbytes(n))
    return stack


async def run(size_mib: int, repeat: int, write_rate: float) -> dict[str, Any]:
    size = size_mib * MIB
    stack = await make_source(size)
    data = await stack.remote.read_at(0, size)
    raw: list[float] = []
    tcp: list[float] = []
    unix: list[float] = []
    tls: list[float] = []
    identical = True
    cert_dir = tempfile.mkdtemp(prefix="ferry-bench-certs-")
    certs = make_certs(cert_dir)
    for _ in range(repeat):
        t, ok = raw_copy(data)
        raw.append(size / MIB / t)
        identical &= ok
        r = await ferry_migrate(stack, "tcp")
        tcp.append(size / MIB / r["elapsed_s"])
        identical &= r["identical"]
        r = await ferry_migrate(stack, "unix")
        unix.append(size / MIB / r["elapsed_s"])
        identical &= r["identical"]
        r = await ferry_migrate(stack, "tls", certs=certs)
        tls.append(size / MIB / r["elapsed_s"])
        identical &= r["identical"]
    shutil.rmtree(cert_dir, ignore_errors=True)
    del data
    dirty = await ferry_migrate(stack, "tcp", write_rate_mib_s=write_rate)
    rep = dirty["report"]
    per_cycle = rep.devices[0].dirty_blocks_by_cycle
    raw_m = statistics.median(raw)
    tcp_m = statistics.median(tcp)
    tls_m = statistics.median(tls)
    return {
        "size_mib": size_mib,
        "repeat": repeat,
        "raw_loopback_mib_s": round(raw_m, 1),
        "migrate_tcp_mib_s": round(tcp_m, 1),
        "ratio_tcp": round(tcp_m / raw_m, 3),
        "migrate_unix_mib_s": round(statistics.median(unix), 1),
        "migrate_tls_mib_s": round(tls_m, 1),
        "ratio_tls": round(tls_m / raw_m, 3),
        "raw_runs_mib_s": [round(x, 1) for x in raw],
        "tcp_runs_mib_s": [round(x, 1) for x in tcp],
        "unix_runs_mib_s": [round(x, 1) for x in unix],
        "tls_runs_mib_s": [round(x, 1) for x in tls],
        "identical": identical,
        "write_rate_mib_s": write_rate,
        "written_mib": round(dirty["written_mib"], 1),
        "dirty_cycles": rep.cycles,
        # Blocks found by each scan, then the final dirty list's.
        "dirty_blocks_per_cycle": per_cycle,
        "stop_reason": rep.stop_reason,
        "amplification": round(rep.devices[0].bytes_total / size, 3),
        # Converged: the policy's own criterion (a run of small dirty sets) ended
        # the cycles, rather than the cycle limit or another stop rule.
        "converged": rep.stop_reason == StopReason.SMALL_DIRTY_SET.value,
        "forced_by_max_cycles": rep.stop_reason == StopReason.CYCLE_LIMIT.value,
        "dirty_total_s": round(dirty["elapsed_s"], 3),
        "dirty_downtime_ms": round((rep.suspend_to_handoff_ack_s or 0) * 1e3, 2),
        "dirty_postcopy_s": round(rep.postcopy_s, 3),
        "dirty_bytes_by_phase": rep.devices[0].bytes_by_phase,
        "dirty_identical": dirty["identical"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write-rate-mib-s", type=float, default=50.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    mp.set_start_method("fork")
    result = asyncio.run(run(args.size_mib, args.repeat, args.write_rate_mib_s))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0 if result["identical"] and result["dirty_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
