"""``/v1/cluster``, ``/v1/cluster/vms`` and ``/v1/node/{drain,cordon,uncordon}``: this
node in its cluster, and package runs the scheduler places.

Only on a daemon started with ``--cluster`` (else ``409 not-in-cluster``). A drain is an
operation of kind ``evacuate`` (:meth:`ferry.daemon.cluster.DaemonCluster.drain`); its
result is the evacuation's (:class:`ferry.cluster.evacuate.EvacuationResult`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ferry.cluster import keys as k
from ferry.cluster.scheduler import place
from ferry.daemon import models as m
from ferry.daemon.client import DaemonError
from ferry.daemon.cluster import DaemonCluster
from ferry.daemon.problems import Problem
from ferry.daemon.state import Daemon

MAX_DEADLINE_S = 3600.0


class PlaceVM(BaseModel):
    """A package run the scheduler places (``POST /v1/vms`` on the node it picks)."""

    model_config = ConfigDict(extra="forbid")
    package: str = Field(min_length=1, max_length=4096)
    """A path every node reads the same (until packages live in the cluster's bucket)."""
    memory_mib: int = Field(gt=0, le=1 << 20)
    """The package's guest RAM, for the placement."""
    name: str | None = Field(None, max_length=63)
    publish: list[str] = Field(default_factory=list, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    mirror: m.MirrorTo | None = None
    """Mirror it to a bucket prefix: if its node dies, another restores it from there."""


class Placed(BaseModel):
    node: str
    operation: dict[str, Any]
    """The run's operation on that node (poll it there: ``GET /v1/operations/{id}``)."""


class Drain(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deadline_s: float = Field(30.0, gt=0, le=MAX_DEADLINE_S)
    """Seconds from now every VM must be out by (a GCP notice gives ~30, AWS 120)."""
    reason: k.CordonReason = k.CordonReason.DRAIN


def routes(d: Daemon) -> APIRouter:
    r = APIRouter(tags=["cluster"])

    def member() -> DaemonCluster:
        if d.cluster is None:
            raise Problem(409, "not-in-cluster", "Not in a cluster",
                          "this daemon runs without --cluster")
        assert isinstance(d.cluster, DaemonCluster)
        return d.cluster

    @r.get("/v1/cluster")
    async def cluster() -> dict[str, Any]:
        """The nodes (record, state, cordon), the VMs' placement, as etcd has them."""
        c = member()
        store = c.store
        nodes = await store.records(k.NODES, k.NodeRecord)
        states = await store.records(k.STATE, k.NodeState)
        cordons = await store.records(k.CORDON, k.Cordon)
        names = sorted(set(nodes) | set(states))
        return {"node": c.config.node_name,
                "connected": bool(c.status and c.status.connected),
                "nodes": [{"name": n, "record": k.to_json(nodes.get(n)),
                           "state": k.to_json(states.get(n)),
                           "cordon": k.to_json(cordons.get(n))} for n in names],
                "vms": {vm: k.to_json(p)
                        for vm, p in (await store.records(k.VMS, k.Placement)).items()}}

    @r.post("/v1/cluster/vms", status_code=202, response_model=Placed)
    async def place_vm(body: PlaceVM) -> Placed:
        """Run a package on the node the scheduler picks (most memory left; never a
        cordoned, noticed or dead node): ``409 no-capacity`` if it fits nowhere."""
        c = member()
        views, records = await c.store.views()
        target = place(views.values(), body.memory_mib * 1024 * 1024)
        if target is None:
            raise Problem(409, "no-capacity", "No capacity",
                          f"no schedulable node has {body.memory_mib} MiB and a VM slot free")
        run = {"package": body.package, "name": body.name, "publish": body.publish,
               "labels": body.labels,
               "mirror": None if body.mirror is None else body.mirror.model_dump()}
        try:
            op = await asyncio.to_thread(c.peers.client(records[target.name].api).call,
                                         "POST", "/v1/vms", run)
        except DaemonError as exc:
            raise Problem(exc.status, "peer", "The node refused", str(exc)) from None
        except OSError as exc:
            raise Problem(502, "peer", "The node did not answer",
                          f"{target.name}: {exc}") from None
        return Placed(node=target.name, operation=op)

    @r.post("/v1/node/drain", status_code=202, response_model=m.Operation)
    async def drain(body: Drain | None = None) -> m.Operation:
        """Cordon this node and move every VM out before the deadline."""
        body = body or Drain(deadline_s=30.0)
        return member().drain(time.time() + body.deadline_s, body.reason)

    @r.post("/v1/node/cordon")
    async def cordon() -> dict[str, Any]:
        c = member()
        await c.store.cordon(c.config.node_name, k.CordonReason.MANUAL)
        return {"node": c.config.node_name, "cordoned": True}

    @r.post("/v1/node/uncordon")
    async def uncordon() -> dict[str, Any]:
        c = member()
        await c.store.uncordon(c.config.node_name)
        return {"node": c.config.node_name, "cordoned": False}

    return r
