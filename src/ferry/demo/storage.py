"""The storage demo: a device group migrated over TCP while a writer changes it.

Two devices ("memory" and "disk", a few hundred MiB each, filled with
random-ish data) are served by a source endpoint and received by a
destination endpoint over loopback TCP, in one process and one event loop
but through real sockets. A writer keeps overwriting random ranges of both
devices (hot spots included, like a guest) until the suspend point; the
destination must then equal the source as it was at the hand-off.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ferry.aio import cancel_and_wait
from ferry.migration.channel import StreamChannel
from ferry.migration.destination import DestinationDevice, Receiver, ReceiveReport
from ferry.migration.policy import DirtyPolicy
from ferry.migration.report import MigrationReport
from ferry.migration.source import MigrationHooks, Migrator
from ferry.migration.stacks import DestinationStack, SourceStack, destination_stack, source_stack
from ferry.protocol.messages import DeviceInfo
from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES
from ferry.storage.providers.memory import MemoryDevice
from ferry.transport.auth import (
    HANDSHAKE_TIMEOUT_S,
    accept_authenticated,
    new_token,
    present_token,
    token_authenticator,
)
from ferry.transport.tcp import connect_tcp, listen_tcp


@dataclass(slots=True)
class DemoResult:
    report: MigrationReport
    receive: ReceiveReport
    writes: int
    written_bytes: int
    identical: bool
    digests: dict[str, str] = field(default_factory=dict)
    address: str = ""


async def _fill(stack: SourceStack, seed: int) -> None:
    rnd = random.Random(seed)
    chunk = 4 * 1024 * 1024
    size = stack.local.size_bytes
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        # Half random, half zeroes, as real memory and disks are.
        data = rnd.randbytes(n // 2) + bytes(n - n // 2)
        await stack.local.write_at(off, data)


async def run_storage_demo(
    *,
    size_mib: Sequence[int] = (256, 128),
    write_rate_mib_s: float = 20.0,
    policy: DirtyPolicy | None = None,
    on_start: Callable[[Migrator, Receiver], None] | None = None,
) -> DemoResult:
    names = ["memory", "disk"][: len(size_mib)] + [f"dev{i}" for i in range(2, len(size_mib))]
    sources = [
        source_stack(name, MemoryDevice(mib * 1024 * 1024, name=name), DEFAULT_BLOCK_SIZE_BYTES)
        for name, mib in zip(names, size_mib, strict=True)
    ]
    for i, s in enumerate(sources):
        await _fill(s, i)
    dests: list[DestinationStack] = []
    stop = asyncio.Event()
    writing: asyncio.Task[None]
    stats = {"writes": 0, "bytes": 0}

    async def writer() -> None:
        rnd = random.Random(42)
        write_bytes = 16 * 1024
        interval = write_bytes / (write_rate_mib_s * 1024 * 1024)
        next_at = time.monotonic()
        while not stop.is_set():
            s = rnd.choice(sources)
            size = s.local.size_bytes
            # 80% of writes hit a hot 5% of the device, like a working set.
            if rnd.random() < 0.8:
                off = rnd.randrange(size // 20)
            else:
                off = rnd.randrange(size - write_bytes)
            await s.local.write_at(off, os.urandom(write_bytes))
            stats["writes"] += 1
            stats["bytes"] += write_bytes
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def suspend() -> None:
        # The writer stops here, so the source stays as it is at the hand-off
        # point and can be compared with the destination after the migration.
        stop.set()
        await writing

    async def open_devices(infos: Sequence[DeviceInfo]) -> list[DestinationDevice]:
        for info in infos:
            dev = MemoryDevice(info.size_bytes, name=info.name)
            dests.append(destination_stack(info.name, dev, info.block_size_bytes))
        return [d.destination_device() for d in dests]

    listener = await listen_tcp("127.0.0.1", 0)
    host, port = listener.address
    token = new_token()  # as `ferry serve` does: the first local connection is not trusted
    async with listener:
        # Not a TaskGroup: it would wrap a failed connect in an ExceptionGroup. The accept
        # is awaited on every path (cancelled if the client side failed).
        accepting = asyncio.create_task(accept_authenticated(listener, token_authenticator(token)))
        try:
            client = await connect_tcp(host, port)
            await present_token(client, token, timeout_s=HANDSHAKE_TIMEOUT_S)
            server = await accepting
        except BaseException:
            await cancel_and_wait(accepting, swallow_errors=True)
            raise
        migrator = Migrator(
            [s.source_device() for s in sources],
            StreamChannel(client),
            policy=policy or DirtyPolicy(cycle_throttle_s=0.2),
            hooks=MigrationHooks(suspend=suspend),
        )
        receiver = Receiver(StreamChannel(server), open_devices)
        if on_start is not None:
            on_start(migrator, receiver)
        async with asyncio.TaskGroup() as tg:
            writing = tg.create_task(writer())
            receiving = tg.create_task(receiver.run())
            report = await migrator.run()
            receive = await receiving
        await client.aclose()
        await server.aclose()
    identical = True
    digests: dict[str, str] = {}
    for d, s in zip(dests, sources, strict=True):
        got = await d.remote.read_at(0, d.remote.size_bytes)
        identical &= got == await s.remote.read_at(0, s.remote.size_bytes)
        digests[d.name] = hashlib.sha256(got).hexdigest()[:16]
    return DemoResult(
        report, receive, stats["writes"], stats["bytes"], identical, digests, f"{host}:{port}"
    )
