"""A loaded node evacuated by a provider's notice: what ``bench/evacuate.py`` and
``ferry demo evacuate`` share.

:class:`LoadedVMs` runs Redis VMs on one node of a :class:`~ferry.testing.cluster.
ClusterSite`, each published on the node's address with a
:class:`~ferry.testing.workload.RedisWriter` (on another host) writing to it without
pause; after the move each writer follows its VM and the acknowledged writes that cannot
be read back are counted. :func:`evacuate_by_notice` injects a notice into the node's
metadata emulator (the node's daemon watches it with ``--spot-watch``, as in a cloud) and
follows the node's event stream from before the notice to the evacuation's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.testing.cluster import ClusterSite
from ferry.testing.workload import RedisWriter

WRITES_BETWEEN = 50
LOAD_TIMEOUT_S = 120.0
EVENTS_TIMEOUT_S = 300.0


class LoadedVMs:
    """``n`` Redis VMs named ``<prefix><i>`` on ``node``, ports ``port + i`` published on
    its address, a writer on each in ``client_host``'s namespace."""

    def __init__(self, c: ClusterSite, node: str, prefix: str, n: int, *, port: int,
                 client_host: str) -> None:
        self.c = c
        self.node = node
        self.port = port
        self.client_host = client_host
        self.vms = [f"{prefix}{i}" for i in range(n)]
        self.writers: dict[str, RedisWriter] = {}
        self.where = dict.fromkeys(self.vms, node)
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, package: Path, progress: Callable[[str], None] = lambda s: None,
                    ) -> None:
        c = self.c
        for i, vm in enumerate(self.vms):
            port = self.port + i
            op = await c.call(self.node, "POST", "/v1/vms", {
                "package": str(package), "name": vm,
                "publish": [f"{c.site.address(self.node)}:{port}:6379"]})
            done = await c.wait(self.node, op)
            if done["state"] != "succeeded":
                raise FerryError(f"run {vm} on {self.node}: {done.get('error')}")
            w = RedisWriter([(c.site.address(h), port) for h in c.nodes],
                            namespace=c.site.hosts[self.client_host].namespace, prefix=vm)
            self.writers[vm] = w
            self.tasks.append(asyncio.create_task(w.run(self.stop)))
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                await w.wait_acknowledged(WRITES_BETWEEN)
            progress(f"{vm} runs on {self.node}, a client writing to it")

    async def finish(self, where: dict[str, str]) -> int:
        """Writes carry on at each VM's new node; then stop and count the lost ones."""
        self.where.update(where)
        for vm, w in self.writers.items():
            w.preferred = self.c.nodes.index(self.where[vm])
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                await w.wait_acknowledged(w.acknowledged_count + WRITES_BETWEEN)
        await self.stop_writers()
        lost = 0
        for w in self.writers.values():
            lost += len(await w.lost())
        return lost

    async def stop_writers(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def discard(self) -> None:
        """Stop the writers and every VM wherever it is (also after a failure)."""
        await self.stop_writers()
        for vm in self.vms:
            with contextlib.suppress(Exception):
                await self.c.call(self.where[vm], "POST", f"/v1/vms/{vm}/stop", {})


@dataclass
class NoticeEvacuation:
    notice: dict[str, Any]
    """The notice as the node's watcher saw it (``Notice.to_json``)."""
    result: dict[str, Any]
    """The evacuation operation's result (``EvacuationResult.to_json``)."""
    notice_to_done_s: float
    """From the notice's injection to the evacuation's end (as the node's events say)."""
    notice_seen_s: float
    """From the injection to the node's ``spot.notice`` event."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """The node's events from its subscription to ``spot.evacuation``, in order."""

    @property
    def steps(self) -> list[str]:
        """The ``evacuation`` events' steps, in order."""
        return [e["step"] for e in self.events if e["kind"] == "evacuation"]

    @property
    def where(self) -> dict[str, str]:
        return {m["vm"]: m["to"] for m in self.result.get("moved", [])}


async def evacuate_by_notice(c: ClusterSite, node: str, provider: str, *,
                             in_s: float | None = None) -> NoticeEvacuation:
    """Inject a ``provider`` notice (``in_s``: AWS's or Azure's time left) in ``node``'s
    metadata emulator and return once the node's evacuation has ended."""
    loop = asyncio.get_running_loop()
    subscribed = asyncio.Event()
    seen: list[tuple[float, dict[str, Any]]] = []

    def follow() -> None:
        for event in c.api(node).events(timeout_s=EVENTS_TIMEOUT_S):
            seen.append((time.monotonic(), event))
            if event["kind"] == "subscribed":  # following: what comes now is seen
                loop.call_soon_threadsafe(subscribed.set)
            if event["kind"] == "spot.evacuation":  # after the evacuation's end
                return
        raise FerryError(f"{node}'s event stream ended before its evacuation did")

    following = asyncio.ensure_future(asyncio.to_thread(follow))
    ready = asyncio.ensure_future(subscribed.wait())
    try:
        async with asyncio.timeout(60):
            await asyncio.wait([following, ready], return_when=asyncio.FIRST_COMPLETED)
        if following.done():
            following.result()  # its error
        injected = time.monotonic()
        c.metadata[node].inject(provider, in_s=in_s)
        async with asyncio.timeout(EVENTS_TIMEOUT_S):
            await following
    finally:
        ready.cancel()
        following.cancel()  # the thread ends at its next event or timeout
    events = [e for _, e in seen]
    [notice] = [e["notice"] for e in events if e["kind"] == "spot.notice"]
    [seen_at] = [t for t, e in seen if e["kind"] == "spot.notice"]
    finished = [t for t, e in seen
                if e["kind"] == "evacuation" and e.get("step") == "evacuation-finished"]
    if not finished:
        raise FerryError(f"{node}'s evacuation did not finish: {events[-1]}")
    evacs = [o for o in await c.call(node, "GET", "/v1/operations") if o["kind"] == "evacuate"]
    op = max(evacs, key=lambda o: float(o["created"]))
    if op["state"] != "succeeded":
        raise FerryError(f"{node}'s evacuation failed: {op.get('error')}")
    return NoticeEvacuation(notice, op["result"], finished[-1] - injected, seen_at - injected,
                            events)
