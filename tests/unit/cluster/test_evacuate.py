"""The evacuation's orchestration against an in-memory cluster and mover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from ferry.cluster import keys as k
from ferry.cluster.errors import ClusterUnavailableError
from ferry.cluster.evacuate import NO_VIEW, evacuate
from ferry.cluster.scheduler import MIB, NodeView, VMDemand
from ferry.errors import FerryError, TransportError


class FakeCluster:
    def __init__(self, nodes: dict[str, NodeView]) -> None:
        self.nodes = nodes
        self.kv: dict[bytes, bytes] = {}
        self.cordoned: list[tuple[str, k.CordonReason]] = []

    async def cordon(self, node: str, reason: k.CordonReason, detail: str = "") -> None:
        self.cordoned.append((node, reason))

    async def views(self) -> tuple[dict[str, NodeView], dict[str, k.NodeRecord]]:
        records = {n: k.NodeRecord(n, f"{n}:1", ["token"], n, v.memory_bytes, v.max_vms,
                                   max_incoming=v.max_incoming)
                   for n, v in self.nodes.items()}
        return dict(self.nodes), records

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> None:
        self.kv[key] = value


class FakeMover:
    def __init__(self, vms: list[VMDemand], *, dead: Iterable[str] = (),
                 move_s: float = 0.01) -> None:
        self.vms = vms
        self.dead = set(dead)
        self.move_s = move_s
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.where: dict[str, str] = {}
        self.packages: list[str] = []

    async def local_vms(self) -> list[VMDemand]:
        return list(self.vms)

    async def move(self, vm: VMDemand, target: k.NodeRecord, *,
                   timeout_s: float) -> dict[str, Any]:
        assert timeout_s > 0
        self.running[target.name] = self.running.get(target.name, 0) + 1
        self.peak[target.name] = max(self.peak.get(target.name, 0),
                                     self.running[target.name])
        try:
            await asyncio.sleep(self.move_s)
            if target.name in self.dead:
                raise TransportError("connection reset", peer=target.name)
        finally:
            self.running[target.name] -= 1
        self.where[vm.vm] = target.name
        return {"downtime_ms": 12.0}

    async def package(self, vm: VMDemand) -> str:
        self.packages.append(vm.vm)
        return f"/pkgs/{vm.vm}.ferry"


def nodes(*names: str, free_mib: int = 1024, max_incoming: int = 1) -> dict[str, NodeView]:
    return {n: NodeView(n, free_mib * MIB, 0, 0, 8, max_incoming) for n in names}


def four(mib: int = 256) -> list[VMDemand]:
    return [VMDemand(f"v{i}", mib * MIB) for i in range(4)]


async def test_every_vm_moves_spread_within_incoming_limits() -> None:
    cluster = FakeCluster({**nodes("src"), **nodes("t1", "t2")})
    mover = FakeMover(four())
    result = await evacuate("src", time.time() + 60, cluster=cluster, mover=mover)
    assert result.complete
    assert sorted(m["vm"] for m in result.moved) == ["v0", "v1", "v2", "v3"]
    assert set(mover.where.values()) == {"t1", "t2"}
    assert max(mover.peak.values()) == 1  # max_incoming
    assert cluster.cordoned == [("src", k.CordonReason.DRAIN)]
    placed = {kk: k.decode(k.Placement, v) for kk, v in cluster.kv.items()
              if kk.startswith(k.VMS.encode())}
    assert {p.vm: p.node for p in placed.values()} == mover.where
    [op] = [k.decode(k.OperationRecord, v) for kk, v in cluster.kv.items()
            if kk.startswith(k.OPERATIONS.encode())]
    assert op.state is k.OpState.SUCCEEDED
    assert op.result is not None
    assert op.result["complete"] is True


async def test_a_target_that_dies_is_left_and_its_vm_retried_elsewhere() -> None:
    cluster = FakeCluster({**nodes("src"), **nodes("t1", "t2", max_incoming=4)})
    mover = FakeMover(four(), dead={"t1"})
    seen: list[tuple[str, dict[str, Any]]] = []
    result = await evacuate("src", time.time() + 60, cluster=cluster, mover=mover,
                            notify=lambda kind, data: seen.append((kind, data)))
    assert result.complete
    assert set(mover.where.values()) == {"t2"}
    retried = {d["vm"] for kind, d in seen if kind == "vm-retry"}
    assert retried  # some went to t1 first
    assert all(m["attempts"] == (2 if m["vm"] in retried else 1) for m in result.moved)
    failed = [k.decode(k.MigrationRecord, v) for kk, v in cluster.kv.items()
              if kk.startswith(k.MIGRATIONS.encode())]
    assert {m.target for m in failed if m.state is k.OpState.FAILED} == {"t1"}


async def test_vms_that_fit_nowhere_are_packaged_and_the_result_says_so() -> None:
    cluster = FakeCluster({**nodes("src"), **nodes("t1", free_mib=300)})
    mover = FakeMover(four())
    result = await evacuate("src", time.time() + 60, cluster=cluster, mover=mover)
    assert len(result.moved) == 1
    assert sorted(p["vm"] for p in result.packaged) == sorted(mover.packages)
    assert len(result.packaged) == 3
    assert {p["reason"] for p in result.packaged} == {"fits on no node"}
    assert result.complete  # every VM left, live or as a package


async def test_no_time_left_means_packages_not_migrations() -> None:
    cluster = FakeCluster({**nodes("src"), **nodes("t1", "t2")})
    mover = FakeMover(four())
    result = await evacuate("src", time.time() + 1, cluster=cluster, mover=mover)
    assert result.moved == []
    assert {p["reason"] for p in result.packaged} == {"no time left for a live migration"}


async def test_a_failing_package_is_reported_not_raised() -> None:
    class Broken(FakeMover):
        async def package(self, vm: VMDemand) -> str:
            raise FerryError("disk full")

    cluster = FakeCluster(nodes("src"))
    result = await evacuate("src", time.time() + 60, cluster=cluster, mover=Broken(four()))
    assert not result.complete
    assert [f["error"] for f in result.failed] == ["disk full"] * 4


async def test_etcd_away_the_vms_still_leave_as_packages() -> None:
    class Away(FakeCluster):
        async def cordon(self, node: str, reason: k.CordonReason, detail: str = "") -> None:
            raise ClusterUnavailableError("connection refused", endpoint="e:2379")

        async def views(self) -> tuple[dict[str, NodeView], dict[str, k.NodeRecord]]:
            raise ClusterUnavailableError("connection refused", endpoint="e:2379")

        async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> None:
            raise ClusterUnavailableError("connection refused", endpoint="e:2379")

    mover = FakeMover(four())
    result = await evacuate("src", time.time() + 60, cluster=Away(nodes("t1")), mover=mover)
    assert result.complete
    assert {p["reason"] for p in result.packaged} == {NO_VIEW}
    assert sorted(mover.packages) == ["v0", "v1", "v2", "v3"]


async def test_a_bug_in_one_move_does_not_stop_the_evacuation() -> None:
    class Buggy(FakeMover):
        async def move(self, vm: VMDemand, target: k.NodeRecord, *,
                       timeout_s: float) -> dict[str, Any]:
            if vm.vm == "v0":
                raise KeyError("address")
            return await super().move(vm, target, timeout_s=timeout_s)

    cluster = FakeCluster({**nodes("src"), **nodes("t1", "t2", max_incoming=4)})
    mover = Buggy(four())
    result = await evacuate("src", time.time() + 60, cluster=cluster, mover=mover)
    assert sorted(m["vm"] for m in result.moved) == ["v1", "v2", "v3"]
    [packaged] = result.packaged  # v0 failed on both targets: packaged, not lost
    assert (packaged["vm"], packaged["attempts"]) == ("v0", 2)
    assert result.complete
