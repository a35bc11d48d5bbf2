"""The cluster end to end: a real etcd, real daemons on three namespace hosts, real VMs.

One etcd member runs on its own namespace host; a daemon on each of ``cluster1``,
``cluster2``, ``cluster3`` joins it (``--cluster``, a shared bearer token, a 3 s lease).
Two small VMs are placed by the scheduler while ``cluster2`` and ``cluster3`` are
cordoned, so on ``cluster1``. ``cluster1``'s daemon watches Azure's Scheduled Events
(``--spot-watch azure``), emulated at 169.254.169.254 inside its namespace; a ``Preempt``
event (NotBefore in 120 s) injected there makes it evacuate itself: both VMs move out
live, one to each other node (the scheduler spreads them, each target takes one incoming
migration at a time), the operation's reason is ``notice``, the events say so, the
placement keys follow, and the event is acknowledged (``StartRequests``) once they are
out. Then ``cluster3``'s daemon is SIGKILLed: its lease expires and a survivor marks it
dead, naming the VM it held. etcd is killed: ``cluster2`` says so and its VM runs on;
etcd returns and ``cluster2`` registers again. Last, a GCP preemption notice for
``cluster2`` (its daemon watches GCP's metadata service): its one target (``cluster1``,
whose daemon was just killed, still alive in etcd under a long lease) fails it: the VM
stays, fits nowhere else, and goes into a package; the result says so. ``ferry node
drain cluster2`` by hand then evacuates a node with nothing left.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ferry.daemon.client import DaemonClient
from ferry.testing.cluster import ClusterSite, all_alive, cluster_on_hosts, until
from ferry.testing.evacuation import evacuate_by_notice
from ferry.testing.packages import Signer
from ferry.testing.site import scratch_root

pytestmark = pytest.mark.e2e

NODES = ["cluster1", "cluster2", "cluster3"]
LEASE_TTL_S = 3


async def _call(api: DaemonClient, method: str, path: str, body: Any = None) -> Any:
    return await asyncio.to_thread(api.call, method, path, body)


async def test_drain_moves_every_vm_out_and_a_killed_node_is_marked_dead(
        signer: Signer, minimal_package: Path) -> None:
    with scratch_root("fcl-") as root:
        async with cluster_on_hosts(NODES, root, signer.env, switch_tag="cluster",
                                    lease_ttl_s=LEASE_TTL_S, max_incoming=1,
                                    lease_ttl_by_node={"cluster1": 60},
                                    spot={"cluster1": "azure", "cluster2": "gcp"}) as c:
            await _scenario(c, minimal_package)


async def _scenario(c: ClusterSite, minimal_package: Path) -> None:
    site, url, procs = c.site, c.url, c.procs
    api = {h: c.api(h) for h in NODES}

    async def cluster_view(h: str = "cluster2") -> Any:
        return await _call(api[h], "GET", "/v1/cluster")

    await until("three nodes alive", lambda: all_alive(c, "cluster2"))
    # Both VMs are placed by the scheduler (asked on cluster2): with cluster2 and cluster3 cordoned,
    # only cluster1 takes them.
    for h in ("cluster2", "cluster3"):
        assert (await _call(api[h], "POST", "/v1/node/cordon"))["cordoned"] is True
    vms = ["cluster-v1", "cluster-v2"]
    for vm in vms:
        placed = await _call(api["cluster2"], "POST", "/v1/cluster/vms", {
            "package": str(minimal_package), "name": vm, "memory_mib": 128})
        assert placed["node"] == "cluster1", placed
        done = await asyncio.to_thread(api["cluster1"].wait, placed["operation"])
        assert done["state"] == "succeeded", done
    too_big = await asyncio.to_thread(api["cluster2"].raw, "POST", "/v1/cluster/vms", json.dumps(
        {"package": str(minimal_package), "memory_mib": 4096}).encode())
    assert too_big[0] == 409, too_big
    for h in ("cluster2", "cluster3"):
        assert (await _call(api[h], "POST", "/v1/node/uncordon"))["cordoned"] is False

    async def placed_on_cluster1() -> bool:
        placed = (await cluster_view())["vms"]
        return all(placed.get(vm, {}).get("node") == "cluster1" for vm in vms)

    await until("placement keys naming cluster1", placed_on_cluster1)

    # A spot notice for cluster1, from the metadata service in its namespace: it evacuates
    # itself. Its event stream is followed from before the notice to the drain's end.
    ev = await evacuate_by_notice(c, "cluster1", "azure", in_s=120)
    notice, seen, steps = ev.notice, ev.events, ev.steps
    assert (notice["provider"], notice["action"]) == ("azure", "preempt"), notice
    assert [e["kind"] for e in seen].count("spot.notice") == 1
    assert (steps[0], steps[-1]) == ("evacuation-started", "evacuation-finished"), steps
    assert steps.count("vm-moved") == 2, steps
    assert seen[-1]["state"] == "completed", seen[-1]

    async def acknowledged() -> bool:  # StartRequests, once the VMs are out
        return c.metadata["cluster1"].acknowledged == [notice["key"]]

    await until("the Azure event acknowledged", acknowledged)
    [evac] = [o for o in await _call(api["cluster1"], "GET", "/v1/operations")
              if o["kind"] == "evacuate"]
    assert evac["state"] == "succeeded"
    drained = evac["result"]
    assert drained == ev.result
    assert drained["reason"] == "notice"
    assert drained["complete"] is True, drained
    assert drained["within_deadline"] is True, drained
    assert drained["packaged"] == []
    assert drained["failed"] == []
    moved = {m["vm"]: m["to"] for m in drained["moved"]}
    assert sorted(moved) == vms
    assert sorted(moved.values()) == ["cluster2", "cluster3"]  # spread over both targets
    assert all(m["downtime_ms"] is not None for m in drained["moved"])
    assert await _call(api["cluster1"], "GET", "/v1/vms") == []
    for vm, target in moved.items():
        [here] = [v for v in await _call(api[target], "GET", "/v1/vms")
                  if v["vm_id"] == vm]
        assert here["status"] == "running"
    view = await cluster_view()
    assert {vm: view["vms"][vm]["node"] for vm in vms} == moved
    [cluster1] = [n for n in view["nodes"] if n["name"] == "cluster1"]
    assert cluster1["cordon"]["reason"] == "notice"
    _, raw = await asyncio.to_thread(api["cluster1"].raw, "GET", "/metrics")
    assert 'ferry_evacuation_vms_total{outcome="moved"} 2.0' in raw.decode()

    # cluster3's daemon dies without a word: its lease expires, cluster2 marks it dead.
    procs["cluster3"].kill()
    await procs["cluster3"].wait()
    on_cluster3 = next(vm for vm, t in moved.items() if t == "cluster3")

    async def cl3_dead() -> Any:
        [n] = [n for n in (await cluster_view())["nodes"] if n["name"] == "cluster3"]
        return n if n["state"]["status"] == "dead" else None

    dead = await until("cluster3 marked dead", cl3_dead, timeout_s=LEASE_TTL_S * 10)
    assert dead["record"] is None  # its node key went with its lease
    assert dead["state"]["vms"] == [on_cluster3]
    # Both survivors watch; exactly one transaction marked it.
    marked = []
    for h in ("cluster1", "cluster2"):
        _, raw = await asyncio.to_thread(api[h].raw, "GET", "/metrics")
        marked.append("ferry_cluster_dead_nodes_total 1.0" in raw.decode())
    assert sorted(marked) == [False, True]

    # etcd dies: cluster2 says so (metric, 503), its VM runs on untouched; etcd returns and
    # cluster2 registers again.
    on_cluster2 = next(vm for vm, t in moved.items() if t == "cluster2")
    await c.etcd.kill(0)

    async def cluster_up(h: str, value: float) -> bool:
        _, raw = await asyncio.to_thread(api[h].raw, "GET", "/metrics")
        return f"ferry_cluster_up {value}" in raw.decode()

    await until("cluster2 reports etcd unreachable", lambda: cluster_up("cluster2", 0.0))
    status, body = await asyncio.to_thread(api["cluster2"].raw, "GET", "/v1/cluster")
    assert status == 503, body
    assert json.loads(body)["type"].endswith("/cluster-unavailable")
    ran = await _call(api["cluster2"], "POST", f"/v1/vms/{on_cluster2}/exec", {"argv": ["true"]})
    assert ran["exit_code"] == 0
    await c.etcd.restart(0)
    await until("cluster2 registered again", lambda: cluster_up("cluster2", 1.0))

    # A GCP preemption notice for cluster2 now. cluster1 takes VMs again, then its daemon
    # dies; its long lease keeps it alive in etcd, so the scheduler picks it, and asking it
    # for a receiver fails (the target died): the VM stays on cluster2, cluster1 is excluded
    # for it, cluster3 is dead; it fits nowhere and is snapshotted into a package here, and
    # the result says so.
    assert (await _call(api["cluster1"], "POST", "/v1/node/uncordon"))["cordoned"] is False
    procs["cluster1"].kill()
    await procs["cluster1"].wait()
    ev = await evacuate_by_notice(c, "cluster2", "gcp")
    result = ev.result
    assert (result["reason"], result["complete"]) == ("notice", True), result
    assert result["within_deadline"] is True, result  # GCP's 30 s
    assert result["moved"] == []
    [packaged] = result["packaged"]
    assert (packaged["vm"], packaged["reason"], packaged["attempts"]) == (
        on_cluster2, "fits on no node", 1)  # tried on cluster1 once, kept here, then packaged
    assert "vm-packaged" in ev.steps
    assert ev.events[-1]["state"] == "completed", ev.events[-1]
    assert await asyncio.to_thread(Path(packaged["package"]).is_file)
    assert [v["vm_id"] for v in await _call(api["cluster2"], "GET", "/v1/vms")
            if v["status"] == "running"] == []
    [cluster1] = [n for n in (await cluster_view())["nodes"] if n["name"] == "cluster1"]
    assert cluster1["state"]["status"] == "alive"  # what made it a target: etcd did not know

    # By hand, as an operator would (a drain request key in etcd, which the node watches):
    # an evacuation of a node with nothing left on it.
    result = await site.ferry_json("cluster2", "node", "drain", "cluster2", "--cluster", url,
                                   "--deadline", "30", timeout_s=120)
    assert (result["reason"], result["complete"]) == ("drain", True), result
    assert (result["moved"], result["packaged"], result["failed"]) == ([], [], [])
