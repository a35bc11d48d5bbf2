"""One node in the cluster: register, heartbeat, keep placement current, watch.

:class:`Membership.run` runs for the daemon's lifetime:

* **Register**: grant a lease of ``lease_ttl_s``, put ``/ferry/nodes/<name>`` (the
  node's record: API address, capacity, usage) under it and ``/ferry/state/<name>`` =
  alive.
* **Heartbeat** every ``lease_ttl_s / 3``: keep the lease alive, refresh the record's
  usage, and make ``/ferry/vms/<id>`` name this node for every VM it holds (and drop
  the keys of VMs that left, unless another node already claimed them).
* **Watch** ``/ferry/nodes/``: a node key deleted is a lease that expired (or a node
  that left: its state says ``left`` first); every member tries to mark it ``dead`` in
  one transaction (:meth:`~ferry.cluster.store.ClusterStore.mark_dead_if_alive`), so one
  succeeds. On (re)connecting, nodes marked alive without a node key are marked dead
  too (they expired while nobody watched). It also watches ``/ferry/drain/<name>``: a
  drain request (``ferry node drain``) starts :func:`~ferry.cluster.evacuate.evacuate`
  here through ``on_drain``.
* **etcd unreachable**: nothing touches the VMs (they are held by their own processes);
  the node says so (``on_status``: an event and the ``ferry_cluster_up`` metric), and
  retries with exponential backoff (:data:`BACKOFF_S`). If its lease expired meanwhile
  it registers again with a new one (and is alive again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from ferry.cluster import keys as k
from ferry.cluster.errors import ClusterError
from ferry.cluster.store import ClusterStore

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Waits between reconnection attempts (the last repeats)."""
DEFAULT_LEASE_TTL_S = 10
"""How long a silent node stays alive: long enough for a loaded host's hiccup (etcd's
own default election timeout is 1 s), short against a 30 s preemption window."""
RESTORING = "restoring"
"""A placement naming this node for a VM another member is restoring here
(:mod:`ferry.cluster.restore`): kept while the restore runs, though the VM is not here
yet."""
RESTORE_GRACE_S = 300.0
"""How long such a placement is kept for a VM that never arrived (its restorer died)."""


class LeaseLostError(ClusterError):
    """The node's lease expired (etcd was away longer than its TTL)."""


@dataclass(frozen=True, slots=True)
class LocalVM:
    vm: str
    memory_bytes: int
    status: str
    mirror: dict[str, Any] | None = None
    """Its mirror (:attr:`~ferry.cluster.keys.Placement.mirror`), if it has one."""


@dataclass(frozen=True, slots=True)
class Status:
    """What the membership says of itself (``on_status``)."""

    connected: bool
    endpoint: str
    error: str | None = None
    retry_in_s: float | None = None
    registrations: int = 0


class Membership:
    def __init__(self, store: ClusterStore, record: Callable[[], k.NodeRecord],
                 local_vms: Callable[[], Awaitable[list[LocalVM]]], *,
                 lease_ttl_s: int = DEFAULT_LEASE_TTL_S,
                 on_status: Callable[[Status], None] = lambda s: None,
                 on_dead: Callable[[str], None] = lambda node: None,
                 on_drain: Callable[[k.DrainRequest], None] = lambda r: None) -> None:
        self.store = store
        self._record = record
        self._local_vms = local_vms
        self.lease_ttl_s = lease_ttl_s
        self._on_status = on_status
        self._on_dead = on_dead
        self._on_drain = on_drain
        self.lease: int | None = None
        self.registrations = 0
        self.connected = False
        self._written: dict[str, k.Placement] = {}
        self._drain_seen: bytes | None = None

    @property
    def name(self) -> str:
        return self._record().name

    async def run(self) -> None:
        """Until cancelled: stay registered; reconnect with backoff."""
        failures = 0
        while True:
            try:
                await self._session()
            except Exception as exc:
                cause = _first_cause(exc)
                if not isinstance(cause, ClusterError):
                    # A bug here must not take the daemon (and its API) down with it.
                    log.error("cluster: unexpected %r", cause, exc_info=cause)
                wait = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                self.connected = False
                log.warning("cluster: %s; VMs keep running; retrying in %.1f s", cause, wait)
                self._on_status(Status(False, self.store.endpoint, str(cause), wait,
                                       self.registrations))
                await asyncio.sleep(wait)
                continue
            failures = 0

    async def _session(self) -> None:
        """One registration and its heartbeat and watches, until one of them fails.
        ClusterUnavailableError: etcd away; LeaseLostError: the lease expired."""
        await self.register()
        self.connected = True
        self._on_status(Status(True, self.store.endpoint, registrations=self.registrations))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._heartbeat())
            tg.create_task(self._watch_nodes())
            tg.create_task(self._watch_drain())

    async def register(self) -> None:
        self._written.clear()
        await self.sync_placements()  # first: it also refreshes the usage the record says
        record = self._stamped()
        self.lease = await self.store.grant(self.lease_ttl_s)
        await self.store.put(k.key(k.NODES, record.name), k.encode(record), lease=self.lease)
        await self.store.put(k.key(k.STATE, record.name),
                             k.encode(k.NodeState(k.NodeStatus.ALIVE, time.time())))
        self.registrations += 1

    def _stamped(self) -> k.NodeRecord:
        return replace(self._record(), heartbeat_at=time.time())

    async def _heartbeat(self) -> None:
        every = max(self.lease_ttl_s / 3, 0.2)
        while True:
            await asyncio.sleep(every)
            assert self.lease is not None
            if await self.store.refresh(self.lease) <= 0:
                raise LeaseLostError(f"lease of node {self.name} expired")
            await self.sync_placements()
            record = self._stamped()
            await self.store.put(k.key(k.NODES, record.name), k.encode(record),
                                 lease=self.lease)

    async def sync_placements(self) -> None:
        """``/ferry/vms/<id>`` names this node for each VM here; keys naming this node
        for VMs no longer here are deleted unless changed since read (a target that
        already claimed the VM wins)."""
        me = self.name
        here = {v.vm: v for v in await self._local_vms()}
        now = time.time()
        for v in here.values():
            want = k.Placement(v.vm, me, v.memory_bytes, v.status, now, v.mirror)
            last = self._written.get(v.vm)
            if last is None or (last.node, last.status, last.memory_bytes, last.mirror) != (
                    want.node, want.status, want.memory_bytes, want.mirror):
                await self.store.put(k.key(k.VMS, v.vm), k.encode(want))
                self._written[v.vm] = want
        for e in await self.store.get_prefix(k.VMS):
            vm = k.name_of(k.VMS, e.key)
            if vm in here:
                continue
            try:
                placed = k.decode(k.Placement, e.value, where=e.key)
            except ClusterError:
                continue
            if placed.node == me and not (placed.status == RESTORING
                                          and now - placed.updated < RESTORE_GRACE_S):
                await self.store.txn(lambda t, e=e: [t.mod(e.key) == e.mod_revision],
                                     lambda t, e=e: [t.delete(e.key)])
                self._written.pop(vm, None)

    async def _watch_nodes(self) -> None:
        for name, state in (await self.store.records(k.STATE, k.NodeState)).items():
            if state.status is k.NodeStatus.ALIVE and await self.store.mark_dead_if_alive(
                    name):
                self._on_dead(name)
        async with self.store.watch(k.NODES) as events:
            async for ev in events:
                if ev.deleted:
                    name = k.name_of(k.NODES, ev.key)
                    if await self.store.mark_dead_if_alive(name):
                        log.warning("cluster: node %s is dead (its lease expired)", name)
                        self._on_dead(name)

    async def _watch_drain(self) -> None:
        key = k.key(k.DRAIN, self.name)
        current = await self.store.get(key)
        if current is not None:
            self._drain(current.value, key)
        async with self.store.watch(key.decode()) as events:
            async for ev in events:
                if not ev.deleted and ev.key == key:
                    self._drain(ev.value, key)

    def _drain(self, value: bytes, key: bytes) -> None:
        if value == self._drain_seen:
            return  # the same request seen again after a reconnect
        self._drain_seen = value
        try:
            request = k.decode(k.DrainRequest, value, where=key)
        except ClusterError as exc:
            log.warning("cluster: ignoring %s", exc)
            return
        self._on_drain(request)

    async def leave(self) -> None:
        """The daemon stops cleanly: state ``left``, then the node key goes with its
        lease (watchers see the delete, find ``left`` and mark nothing)."""
        if self.lease is None:
            return
        with contextlib.suppress(ClusterError):
            await self.store.put(k.key(k.STATE, self.name),
                                 k.encode(k.NodeState(k.NodeStatus.LEFT, time.time())))
            await self.store.revoke(self.lease)
        self.lease = None


def _first_cause(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (the task group's failure), else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
