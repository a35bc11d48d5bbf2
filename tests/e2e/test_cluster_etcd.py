"""Cluster membership against a real etcd on loopback (no VMs: seconds, not minutes).

Two in-process members with short leases: one stops heart-beating and the other marks
it dead, naming its VMs; one that leaves cleanly is ``left``, not dead; with etcd gone
a member says so and retries, and registers again once etcd is back; with three etcd
members one may die and the client moves on to another; hostile values in the keys
are skipped, not fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator

import pytest

from ferry.aio import cancel_and_wait
from ferry.cluster import keys as k
from ferry.cluster.membership import LocalVM, Membership, Status
from ferry.cluster.store import ClusterStore
from ferry.testing.cluster import until
from ferry.testing.etcd import EtcdCluster, etcd_cluster

pytestmark = pytest.mark.e2e

TTL_S = 2


def record(name: str) -> k.NodeRecord:
    return k.NodeRecord(name, f"127.0.0.1:{7000 + len(name)}", ["token"], "127.0.0.1",
                        1 << 30, 8)


class Node:
    """A member with a fixed VM list, its status and dead reports collected."""

    def __init__(self, store: ClusterStore, name: str, vms: list[str]) -> None:
        self.vms = vms
        self.statuses: list[Status] = []
        self.dead: list[str] = []
        self.member = Membership(store, lambda: record(name), self.local_vms,
                                 lease_ttl_s=TTL_S, on_status=self.statuses.append,
                                 on_dead=self.dead.append)
        self.task: asyncio.Task[None] | None = None

    async def local_vms(self) -> list[LocalVM]:
        return [LocalVM(v, 128 << 20, "running") for v in self.vms]

    def start(self) -> None:
        self.task = asyncio.create_task(self.member.run())

    async def stop(self) -> None:
        if self.task is not None:
            await cancel_and_wait(self.task, swallow_errors=True)


@contextlib.asynccontextmanager
async def nodes(etcd: EtcdCluster, *specs: tuple[str, list[str]]) -> AsyncIterator[list[Node]]:
    stores = [ClusterStore(etcd.endpoints) for _ in specs]
    made = [Node(s, name, vms) for s, (name, vms) in zip(stores, specs, strict=True)]
    for n in made:
        n.start()
    try:
        yield made
    finally:
        for n in made:
            await n.stop()
        for s in stores:
            await s.close()


async def state(store: ClusterStore, name: str) -> k.NodeState | None:
    return await store.record(k.STATE, name, k.NodeState)


async def test_a_node_that_stops_heartbeating_is_marked_dead_with_its_vms() -> None:
    async with etcd_cluster() as etcd, ClusterStore(etcd.endpoints) as store, \
            nodes(etcd, ("ca", ["va1"]), ("cb", ["vb1", "vb2"])) as (a, b):
        async def both_alive() -> bool:
            views, _ = await store.views()
            return sorted(views) == ["ca", "cb"]

        await until("two nodes registered", both_alive)
        placed = await store.records(k.VMS, k.Placement)
        assert {vm: p.node for vm, p in placed.items()} == {"va1": "ca", "vb1": "cb",
                                                            "vb2": "cb"}
        await b.stop()  # no leave: its lease just runs out
        started = time.monotonic()

        async def b_dead() -> k.NodeState | None:
            s = await state(store, "cb")
            return s if s is not None and s.status is k.NodeStatus.DEAD else None

        dead = await until("cb marked dead", b_dead)
        assert time.monotonic() - started >= TTL_S - 1  # not before its lease ran out
        assert dead.vms == ["vb1", "vb2"]
        assert a.dead == ["cb"]
        assert await store.record(k.NODES, "cb", k.NodeRecord) is None
        # A VM placed on a dead node stays known (its key has no lease).
        assert (await store.record(k.VMS, "vb1", k.Placement)) is not None


async def test_a_node_that_leaves_cleanly_is_left_not_dead() -> None:
    async with etcd_cluster() as etcd, ClusterStore(etcd.endpoints) as store, \
            nodes(etcd, ("la", []), ("lb", [])) as (a, b):
        await until("lb registered", lambda: store.record(k.NODES, "lb", k.NodeRecord))
        await b.stop()
        await b.member.leave()
        left = await until("lb left", lambda: state(store, "lb"))
        assert left.status is k.NodeStatus.LEFT
        assert await store.record(k.NODES, "lb", k.NodeRecord) is None  # lease revoked
        await asyncio.sleep(1.0)  # the survivor's watch saw the delete by now
        assert (await state(store, "lb")) == left
        assert a.dead == []


async def test_etcd_away_the_node_says_so_retries_and_registers_again() -> None:
    async with etcd_cluster() as etcd, ClusterStore(etcd.endpoints) as store:
        node = Node(ClusterStore(etcd.endpoints), "ua", ["vu1"])
        node.start()
        try:
            await until("registered", lambda: store.record(k.NODES, "ua", k.NodeRecord))
            await etcd.kill(0)  # etcd dies; the node's VMs are not touched
            await until("unreachable reported",
                        lambda: _true(any(not s.connected for s in node.statuses)))
            down = [s for s in node.statuses if not s.connected]
            assert down[0].retry_in_s is not None
            assert down[0].error
            assert node.task is not None
            assert not node.task.done()  # it keeps trying
            await asyncio.sleep(TTL_S + 1)  # its lease runs out meanwhile
            await etcd.restart(0)
            await until("connected again", lambda: _true(node.statuses[-1].connected),
                        timeout_s=30)
            assert node.member.registrations == 2  # a new lease
            s = await state(store, "ua")
            assert s is not None
            assert s.status is k.NodeStatus.ALIVE
            assert await store.record(k.NODES, "ua", k.NodeRecord) is not None
        finally:
            await node.stop()
            await node.member.store.close()


async def _true(value: bool) -> bool:
    return value


async def test_three_members_one_dies_the_client_moves_on() -> None:
    async with etcd_cluster(3) as etcd, ClusterStore(etcd.endpoints) as store:
        await store.put(b"/ferry/test/x", b"1")
        await etcd.kill(0)  # the member the store talks to first
        got = None
        for _ in range(len(etcd.endpoints)):  # one failed call rotates the endpoint
            with contextlib.suppress(Exception):
                got = await store.get(b"/ferry/test/x")
                break
        assert got is not None
        assert got.value == b"1"
        assert store.endpoint != f"{etcd.endpoints[0][0]}:{etcd.endpoints[0][1]}"
        for i in (1, 2):  # a member that lost a peer takes seconds to stop politely
            await etcd.kill(i)


async def test_hostile_values_are_skipped_not_fatal() -> None:
    async with etcd_cluster() as etcd, ClusterStore(etcd.endpoints) as store:
        await store.put(b"/ferry/nodes/good", k.encode(record("good")))
        for name, value in (("junk", b"\xff\xfe not json"), ("list", b"[1, 2]"),
                            ("huge", b'{"x": "' + b"a" * (k.MAX_VALUE_BYTES + 1) + b'"}'),
                            ("wrong", b'{"name": "wrong", "api": 7}')):
            await store.put(f"/ferry/nodes/{name}".encode(), value)
        assert list(await store.records(k.NODES, k.NodeRecord)) == ["good"]


async def test_ferry_node_cordons_lists_and_asks_for_drains() -> None:
    async with etcd_cluster() as etcd, ClusterStore(etcd.endpoints) as store, \
            nodes(etcd, ("na", ["vn1"])):
        await until("na registered", lambda: store.record(k.NODES, "na", k.NodeRecord))

        async def ferry(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ferry.cli.main", "node", *args, "--cluster", etcd.url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        assert (await ferry("cordon", "na"))[0] == 0
        cordon = await store.record(k.CORDON, "na", k.Cordon)
        assert cordon is not None
        assert cordon.reason is k.CordonReason.MANUAL
        code, out, _ = await ferry("ls", "--json")
        assert code == 0
        [row] = json.loads(out)
        assert row == {**row, "name": "na", "state": "alive", "cordoned": True,
                       "api": record("na").api}
        code, _, _ = await ferry("drain", "na", "--deadline", "20", "--no-wait")
        assert code == 0
        asked = await store.record(k.DRAIN, "na", k.DrainRequest)
        assert asked is not None
        assert 0 < asked.deadline_at - time.time() <= 20
