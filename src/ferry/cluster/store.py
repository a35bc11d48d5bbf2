"""The cluster's state in etcd, through ``aetcd`` (asyncio, gRPC; docs/cluster.md says why).

:class:`ClusterStore` is the one place that talks to etcd: every ``aetcd`` and gRPC
error is translated here, once, into :class:`ClusterUnavailableError` (etcd did not
answer: the caller backs off and retries) and the current endpoint is rotated, so with
several members a client moves on to a live one. Above the primitives (get, put under a
lease, transactions, prefix watches) it reads and writes the records of
:mod:`ferry.cluster.keys`, and implements what an evacuation needs of the cluster
(:class:`ferry.cluster.evacuate.ClusterOps`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

from ferry.cluster import keys as k
from ferry.cluster.errors import ClusterError, ClusterUnavailableError
from ferry.cluster.scheduler import NodeView
from ferry.errors import ConfigError

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5
"""Each etcd request's deadline: a partitioned etcd must not hang a heartbeat."""

R = TypeVar("R")


def parse_url(url: str) -> list[tuple[str, int]]:
    """``etcd://HOST:PORT[,HOST:PORT...]`` -> endpoints (ConfigError if malformed)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "etcd" or not rest:
        raise ConfigError(f"cluster {url!r}: use etcd://HOST:PORT[,HOST:PORT...]")
    out = []
    for part in rest.strip("/").split(","):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"cluster {url!r}: {part!r} is not HOST:PORT")
        out.append((host.strip("[]"), int(port)))
    return out


@dataclass(frozen=True, slots=True)
class Entry:
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    key: bytes
    value: bytes
    revision: int


class ClusterStore:
    """A connection to etcd (``endpoints`` tried in turn); an async context manager."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], *,
                 timeout_s: int = RPC_TIMEOUT_S) -> None:
        if not endpoints:
            raise ConfigError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self._timeout_s = timeout_s
        self._current = 0
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._current]
        return f"{host}:{port}"

    async def __aenter__(self) -> ClusterStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _rotate(self) -> None:
        await self.close()
        self._current = (self._current + 1) % len(self.endpoints)

    def _connection(self) -> Any:
        if self._client is None:
            host, port = self.endpoints[self._current]
            self._client = aetcd.Client(host=host, port=port, timeout=self._timeout_s)
        return self._client

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(client, ...)``; etcd's failures become ClusterUnavailableError."""
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(self._timeout_s + 1):
                return await fn(self._connection(), *args, **kwargs)
        except (aetcd.exceptions.ClientError, OSError, TimeoutError) as exc:
            await self._rotate()
            raise ClusterUnavailableError(f"{what}: {type(exc).__name__} {exc}".strip(),
                                          endpoint=endpoint) from None

    # -- primitives ---------------------------------------------------------------

    async def get(self, key: bytes) -> Entry | None:
        got = await self._call("get", lambda c: c.get(key))
        return None if got is None else Entry(key, got.value, got.mod_revision)

    async def get_prefix(self, prefix: str) -> list[Entry]:
        got = await self._call("get prefix", lambda c: c.get_prefix(prefix.encode()))
        return [Entry(kv.key, kv.value, kv.mod_revision) for kv in got]

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> None:
        await self._call("put", lambda c: c.put(key, value, lease=lease))

    async def delete(self, key: bytes) -> None:
        await self._call("delete", lambda c: c.delete(key))

    async def grant(self, ttl_s: int) -> int:
        lease = await self._call("lease grant", lambda c: c.lease(ttl_s))
        return int(lease.id)

    async def refresh(self, lease: int) -> int:
        """Keep ``lease`` alive; its TTL now (0 or less: it had expired)."""
        reply = await self._call("lease keepalive", lambda c: c.refresh_lease(lease))
        return int(getattr(reply, "TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self._call("lease revoke", lambda c: c.revoke_lease(lease))

    async def txn(self, compare: Any, success: Any, failure: Any = ()) -> bool:
        """``compare``, ``success``, ``failure``: functions of the client's
        ``transactions`` builder, returning lists."""
        def run(c: Any) -> Any:
            t = c.transactions
            return c.transaction(compare=compare(t), success=success(t),
                                 failure=list(failure(t)) if callable(failure) else [])
        ok, _ = await self._call("transaction", run)
        return bool(ok)

    @contextlib.asynccontextmanager
    async def watch(self, prefix: str, *, start_revision: int | None = None,
                    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        """The events under ``prefix`` (from ``start_revision``), as an async iterator
        inside the context; a broken watch raises ClusterUnavailableError."""
        endpoint = self.endpoint
        w = await self._call("watch", lambda c: c.watch_prefix(
            prefix.encode(), start_revision=start_revision))

        async def events() -> AsyncIterator[WatchEvent]:
            try:
                async for ev in w:
                    yield WatchEvent(ev.kind == aetcd.EventKind.DELETE, ev.kv.key,
                                     ev.kv.value, ev.kv.mod_revision)
            except (aetcd.exceptions.ClientError, OSError) as exc:
                await self._rotate()
                raise ClusterUnavailableError(f"watch {prefix}: {exc}",
                                              endpoint=endpoint) from None
            raise ClusterUnavailableError(f"watch {prefix} ended", endpoint=endpoint)

        try:
            yield events()
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await w.cancel()

    # -- records ------------------------------------------------------------------

    async def records(self, prefix: str, cls: type[R]) -> dict[str, R]:
        """Every record under ``prefix``, by name; malformed values are skipped (logged):
        a stranger's key must not stop the cluster."""
        out: dict[str, R] = {}
        for e in await self.get_prefix(prefix):
            name = k.name_of(prefix, e.key)
            try:
                out[name] = k.decode(cls, e.value, where=e.key)
            except ClusterError as exc:
                log.warning("skipping %s", exc)
        return out

    async def record(self, prefix: str, name: str, cls: type[R]) -> R | None:
        e = await self.get(k.key(prefix, name))
        return None if e is None else k.decode(cls, e.value, where=e.key)

    async def cordon(self, node: str, reason: k.CordonReason, detail: str = "") -> None:
        await self.put(k.key(k.CORDON, node), k.encode(k.Cordon(reason, time.time(), detail)))

    async def uncordon(self, node: str) -> None:
        await self.delete(k.key(k.CORDON, node))

    async def replace_placement(self, vm: str, on: str, new: k.Placement) -> bool:
        """Put ``new`` as ``vm``'s placement if the key still names node ``on`` (read and
        compared in one transaction): False if it names another node, or changed between
        the read and the write (its node came back, or another member took it)."""
        key = k.key(k.VMS, vm)
        e = await self.get(key)
        if e is None:
            return False
        try:
            if k.decode(k.Placement, e.value, where=e.key).node != on:
                return False
        except ClusterError:
            return False
        return await self.txn(lambda t: [t.mod(key) == e.mod_revision],
                              lambda t: [t.put(key, k.encode(new))])

    async def mark_dead_if_alive(self, node: str) -> bool:
        """Mark ``node`` dead if its state says alive and its node key (under its lease)
        is gone; one transaction, so every watcher may try and exactly one succeeds."""
        state = await self.get(k.key(k.STATE, node))
        if state is None:
            return False
        try:
            current = k.decode(k.NodeState, state.value, where=state.key)
        except ClusterError:
            return False
        if current.status is not k.NodeStatus.ALIVE:
            return False
        lost = sorted(vm for vm, p in (await self.records(k.VMS, k.Placement)).items()
                      if p.node == node)
        dead = k.encode(k.NodeState(k.NodeStatus.DEAD, time.time(), lost))
        state_key, node_key = k.key(k.STATE, node), k.key(k.NODES, node)
        return await self.txn(
            lambda t: [t.mod(state_key) == state.mod_revision, t.version(node_key) == 0],
            lambda t: [t.put(state_key, dead)])

    async def views(self) -> tuple[dict[str, NodeView], dict[str, k.NodeRecord]]:
        """Every registered node as the scheduler sees it, and its record. Incoming
        counts the migrations running to it; cordoned or not-alive nodes are not
        schedulable."""
        nodes = await self.records(k.NODES, k.NodeRecord)
        states = await self.records(k.STATE, k.NodeState)
        cordons = await self.records(k.CORDON, k.Cordon)
        migrations = await self.records(k.MIGRATIONS, k.MigrationRecord)
        incoming: dict[str, int] = {}
        for m in migrations.values():
            if m.state is k.OpState.RUNNING:
                incoming[m.target] = incoming.get(m.target, 0) + 1
        views = {}
        for name, r in nodes.items():
            state = states.get(name)
            alive = state is not None and state.status is k.NodeStatus.ALIVE
            views[name] = NodeView(name, r.memory_bytes, r.memory_used_bytes, r.vms,
                                   r.max_vms, r.max_incoming, incoming.get(name, 0),
                                   alive and name not in cordons)
        return views, nodes
