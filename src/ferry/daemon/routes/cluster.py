"""``/v1/cluster`` and ``/v1/node/{drain,cordon,uncordon}``: this node in its cluster.

Only on a daemon started with ``--cluster`` (else ``409 not-in-cluster``). A drain is an
operation of kind ``evacuate`` (:meth:`ferry.daemon.cluster.DaemonCluster.drain`); its
result is the evacuation's (:class:`ferry.cluster.evacuate.EvacuationResult`).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ferry.cluster import keys as k
from ferry.daemon import models as m
from ferry.daemon.cluster import DaemonCluster
from ferry.daemon.problems import Problem
from ferry.daemon.state import Daemon

MAX_DEADLINE_S = 3600.0


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
