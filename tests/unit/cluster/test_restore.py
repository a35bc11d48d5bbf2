"""A dead node's VMs restored from their mirrors, against an in-memory cluster."""

from __future__ import annotations

from typing import Any

from ferry.cluster import keys as k
from ferry.cluster.errors import ClusterUnavailableError, RestoreError
from ferry.cluster.membership import RESTORING
from ferry.cluster.restore import LOST, MAX_ATTEMPTS, next_prefix, restore_dead
from ferry.cluster.scheduler import MIB, NodeView

NOW = 1_700_000_000.0


def mirror(vm: str) -> dict[str, Any]:
    return {"url": f"s3://b/{vm}", "interval_s": 2.0, "endpoint_url": None,
            "region": None, "profile": None}


class FakeCluster:
    def __init__(self, nodes: dict[str, NodeView], placed: list[k.Placement]) -> None:
        self.nodes = nodes
        self.placed = {p.vm: p for p in placed}
        self.away = False
        self.history: list[tuple[str, str, str]] = []
        """(vm, node, status) of every placement write."""

    async def records(self, prefix: str, cls: type[k.Placement]) -> dict[str, k.Placement]:
        assert (prefix, cls) == (k.VMS, k.Placement)
        return dict(self.placed)

    async def views(self) -> tuple[dict[str, NodeView], dict[str, k.NodeRecord]]:
        if self.away:
            raise ClusterUnavailableError("etcd away", endpoint="e:2379")
        records = {n: k.NodeRecord(n, f"{n}:1", ["token"], n, v.memory_bytes, v.max_vms)
                   for n, v in self.nodes.items()}
        return dict(self.nodes), records

    async def replace_placement(self, vm: str, on: str, new: k.Placement) -> bool:
        if vm not in self.placed or self.placed[vm].node != on:
            return False
        self.placed[vm] = new
        self.history.append((vm, new.node, new.status))
        return True


class FakeRestorer:
    def __init__(self, cluster: FakeCluster, *, failing: set[str] | None = None) -> None:
        self.cluster = cluster
        self.failing = failing or set()
        self.calls: list[tuple[str, str, str]] = []

    async def restore(self, placement: k.Placement, target: k.NodeRecord,
                      mirror_to: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((placement.vm, target.name, mirror_to["url"]))
        # What the target's restore sees in etcd meanwhile: the key taken for it.
        assert self.cluster.placed[placement.vm].node == target.name
        assert self.cluster.placed[placement.vm].status == RESTORING
        if target.name in self.failing:
            raise RestoreError("refused", node=target.name)
        return {"vm_id": placement.vm, "restored_from": {"age_s": 1.5}}


def view(name: str, free_mib: int = 1024, *, schedulable: bool = True) -> NodeView:
    return NodeView(name, free_mib * MIB, 0, 0, 8, 2, 0, schedulable)


def placement(vm: str, node: str = "dead", *, mirrored: bool = True,
              mib: int = 256) -> k.Placement:
    return k.Placement(vm, node, mib * MIB, "running", NOW - 60,
                       mirror(vm) if mirrored else None)


async def test_mirrored_vms_are_restored_elsewhere_and_the_rest_reported_lost() -> None:
    cluster = FakeCluster({"dead": view("dead", schedulable=False), "a": view("a"),
                           "b": view("b", 300)},
                          [placement("v1"), placement("v2"), placement("plain", mirrored=False),
                           placement("elsewhere", "a")])
    restorer = FakeRestorer(cluster)
    seen: list[str] = []
    result = await restore_dead("dead", cluster=cluster, restorer=restorer,
                                notify=lambda kind, data: seen.append(kind), clock=lambda: NOW)
    assert [(r["vm"], r["to"], r["attempts"]) for r in result.restored] == [
        ("v1", "a", 1), ("v2", "a", 1)]  # most memory left first; a's bookings counted
    assert result.restored[0]["mirror_to"] == "s3://b/v1-r1700000000"
    assert result.restored[0]["from"] == "s3://b/v1"
    assert result.restored[0]["checkpoint_age_s"] == 1.5
    assert result.lost == [{"vm": "plain", "reason": "not mirrored"}]
    assert [c[0] for c in restorer.calls] == ["v1", "v2"]  # never "elsewhere"
    assert cluster.placed["v1"].mirror == {**mirror("v1"), "url": "s3://b/v1-r1700000000"}
    assert cluster.placed["elsewhere"].node == "a"
    assert seen.count("vm-restored") == 2
    assert seen.count("vm-lost") == 1
    assert result.to_json()["elapsed_s"] == 0.0


async def test_a_failing_target_is_excluded_and_the_next_one_restores() -> None:
    cluster = FakeCluster({"dead": view("dead", schedulable=False), "a": view("a", 2048),
                           "b": view("b")}, [placement("v1")])
    restorer = FakeRestorer(cluster, failing={"a"})
    result = await restore_dead("dead", cluster=cluster, restorer=restorer, clock=lambda: NOW)
    assert [(c[0], c[1]) for c in restorer.calls] == [("v1", "a"), ("v1", "b")]
    assert [(r["to"], r["attempts"]) for r in result.restored] == [("b", 2)]
    assert cluster.history == [("v1", "a", RESTORING), ("v1", "b", RESTORING)]


async def test_no_target_takes_it_the_placement_names_the_dead_node_as_lost() -> None:
    cluster = FakeCluster({"dead": view("dead", schedulable=False),
                           **{f"n{i}": view(f"n{i}") for i in range(MAX_ATTEMPTS + 1)}},
                          [placement("v1")])
    restorer = FakeRestorer(cluster, failing={f"n{i}" for i in range(MAX_ATTEMPTS + 1)})
    result = await restore_dead("dead", cluster=cluster, restorer=restorer, clock=lambda: NOW)
    assert len(restorer.calls) == MAX_ATTEMPTS
    assert result.restored == []
    [lost] = result.lost
    assert lost["vm"] == "v1"
    assert "refused" in lost["reason"]
    assert (cluster.placed["v1"].node, cluster.placed["v1"].status) == ("dead", LOST)
    # Lost is final: a second restore of the same death leaves it alone.
    again = await restore_dead("dead", cluster=cluster, restorer=restorer, clock=lambda: NOW)
    assert (again.restored, again.lost, len(restorer.calls)) == ([], [], MAX_ATTEMPTS)


async def test_too_big_for_every_node_is_lost_without_a_try() -> None:
    cluster = FakeCluster({"dead": view("dead", schedulable=False), "a": view("a", 128)},
                          [placement("v1", mib=256)])
    restorer = FakeRestorer(cluster)
    result = await restore_dead("dead", cluster=cluster, restorer=restorer, clock=lambda: NOW)
    assert restorer.calls == []
    assert result.lost == [{"vm": "v1", "reason": "fits on no node"}]


async def test_a_vm_whose_node_came_back_is_skipped() -> None:
    cluster = FakeCluster({"dead": view("dead", schedulable=False), "a": view("a")},
                          [placement("v1")])
    restorer = FakeRestorer(cluster)
    real = cluster.replace_placement

    async def came_back(vm: str, on: str, new: k.Placement) -> bool:
        # Its node came back and rewrote the key since the read.
        cluster.placed[vm] = k.Placement(vm, "returned", MIB, "running", NOW)
        return await real(vm, on, new)

    cluster.replace_placement = came_back  # type: ignore[method-assign]
    result = await restore_dead("dead", cluster=cluster, restorer=restorer, clock=lambda: NOW)
    assert (result.skipped, result.restored, restorer.calls) == (["v1"], [], [])


async def test_etcd_away_the_vm_is_reported_lost_not_raised() -> None:
    cluster = FakeCluster({"a": view("a")}, [placement("v1")])
    cluster.away = True
    result = await restore_dead("dead", cluster=cluster, restorer=FakeRestorer(cluster),
                                clock=lambda: NOW)
    [lost] = result.lost
    assert lost["vm"] == "v1"
    assert "no view of the cluster" in lost["reason"]


def test_next_prefix_is_beside_the_old_one() -> None:
    assert next_prefix("s3://b/web/", now=12.7) == "s3://b/web-r12"
