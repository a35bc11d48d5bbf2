"""This daemon as a member of a cluster (``ferry daemon --cluster etcd://HOST:PORT``).

:class:`DaemonCluster` joins the cluster through :class:`~ferry.cluster.membership.
Membership` (its record: the TCP API address, capacity, usage; its VMs' placement
keys) and evacuates this node (:meth:`DaemonCluster.drain`) with
:func:`ferry.cluster.evacuate.evacuate`, moving VMs with the migrate route's own path
(:func:`ferry.daemon.moves.migrate_out`) to receivers it asks other daemons for
(``POST /v1/receivers`` over their TCP API). The cluster's nodes share one API
credential: the same bearer token file, or certificates of one CA (docs/cluster.md);
it is never written to etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import ferry
from ferry.cluster import keys as k
from ferry.cluster.errors import EvacuationError, RestoreError
from ferry.cluster.evacuate import (
    DEFAULT_BYTES_PER_S,
    DEFAULT_MAX_PARALLEL,
    EvacuationResult,
    evacuate,
)
from ferry.cluster.membership import DEFAULT_LEASE_TTL_S, LocalVM, Membership, Status
from ferry.cluster.restore import restore_dead
from ferry.cluster.scheduler import VMDemand, observed_bytes_per_s
from ferry.cluster.store import ClusterStore
from ferry.daemon.client import DaemonClient, DaemonError
from ferry.daemon.models import Operation
from ferry.daemon.moves import migrate_out
from ferry.daemon.state import Daemon, host_memory
from ferry.errors import FerryError
from ferry.live.access import Access
from ferry.node import listing
from ferry.node.control import ExportReply, MigrateRequest
from ferry.spot import Notice

log = logging.getLogger(__name__)

RECEIVER_TIMEOUT_S = 60.0
RESTORE_TIMEOUT_S = 120.0
"""A target's restore of one VM: its checkpoint's small files fetched, the guest resumed."""
NOTICE_GRACE_S = 60.0
"""How long past a notice's deadline its handler waits for the evacuation to end (VMs
handed off by then finish their post-copy from the next hosts)."""
PACE_SAMPLES = 20
"""Past migrations the evacuation order's pace is taken from."""
"""Asking a target daemon for a receiver (it starts a holder process)."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    endpoints: list[tuple[str, int]]
    node_name: str
    lease_ttl_s: int = DEFAULT_LEASE_TTL_S
    memory_bytes: int | None = None
    """Guest RAM offered to VMs (default: 80% of the host's memory)."""
    max_vms: int = 32
    max_incoming: int = 2
    max_parallel_out: int = DEFAULT_MAX_PARALLEL

    def __post_init__(self) -> None:
        k.check_name(self.node_name)


@dataclass(frozen=True, slots=True)
class PeerAccess:
    """How this daemon calls the other nodes' APIs: the cluster's shared credential."""

    token: str | None = None
    ssl_context: ssl.SSLContext | None = None

    def client(self, api: str) -> DaemonClient:
        host, _, port = api.rpartition(":")
        return DaemonClient.tcp(host, int(port), self.token, ssl_context=self.ssl_context)


class DaemonCluster:
    def __init__(self, d: Daemon, config: ClusterConfig, peers: PeerAccess,
                 api_auth: list[str]) -> None:
        self.d = d
        self.config = config
        self.peers = peers
        self.api_auth = api_auth
        self.store = ClusterStore(config.endpoints)
        self.api: str | None = None
        self.address: str | None = None
        self._api_known = asyncio.Event()
        self.membership = Membership(self.store, self.record, self.local_vms,
                                     lease_ttl_s=config.lease_ttl_s,
                                     on_status=self._status, on_dead=self._dead,
                                     on_drain=self._drain_requested)
        self.status: Status | None = None
        self._usage = (0, 0)
        self.evacuation: str | None = None
        """The operation id of the evacuation running now."""

    def set_api(self, host: str, port: int) -> None:
        """The TCP API's address, once it listens (registered as this node's)."""
        self.api, self.address = f"{host}:{port}", host
        self._api_known.set()

    async def run(self) -> None:
        await self._api_known.wait()
        await self.membership.run()

    async def close(self) -> None:
        await self.membership.leave()
        await self.store.close()

    # -- what the membership asks ------------------------------------------------

    def record(self) -> k.NodeRecord:
        """This node's record; usage as :meth:`local_vms` last read it (the membership
        reads the VMs, off the event loop, before each record)."""
        used_bytes, count = self._usage
        total, _ = host_memory()
        offered = self.config.memory_bytes if self.config.memory_bytes is not None \
            else int(total * 0.8)
        assert self.api is not None
        assert self.address is not None
        return k.NodeRecord(self.config.node_name, self.api, self.api_auth, self.address,
                            offered, self.config.max_vms,
                            memory_used_bytes=used_bytes, vms=count,
                            max_incoming=self.config.max_incoming,
                            version=ferry.__version__)

    async def local_vms(self) -> list[LocalVM]:
        views = await asyncio.to_thread(listing.vm_views, self.d.paths)
        self._usage = (sum(v["memory_bytes"] or 0 for v in views), len(views))
        return [LocalVM(v["vm_id"], v["memory_bytes"] or 0, v["status"], v.get("mirror_to"))
                for v in views if v["status"] in ("running", "suspended", "migrating")]

    def _status(self, status: Status) -> None:
        self.status = status
        self.d.metrics.cluster_up.set(1 if status.connected else 0)
        if not status.connected:
            self.d.metrics.cluster_retries.inc()
        self.d.events.publish("cluster", state="connected" if status.connected
                              else "unreachable", endpoint=status.endpoint,
                              error=status.error, retry_in_s=status.retry_in_s)

    def _dead(self, node: str) -> None:
        """This member marked ``node`` dead (exactly one does): restore its mirrored VMs
        on the nodes that live (an operation of kind ``restore-dead``)."""
        self.d.metrics.dead_nodes.inc()
        self.d.events.publish("cluster", state="node-dead", node=node)

        async def work(op_id: str) -> dict[str, Any]:
            vms: dict[str, str] = {}

            def notify(kind: str, data: dict[str, Any]) -> None:
                self.d.events.publish("restore", step=kind, operation=op_id, node=node,
                                      **data)
                if kind in ("vm-restored", "vm-lost"):
                    self.d.metrics.restored_vms.labels(kind.removeprefix("vm-")).inc()
                vms[data["vm"]] = kind.removeprefix("vm-") + (
                    f" on {data['to']}" if "to" in data else "")
                self.d.ops.report(op_id, {"node": node, "vms": dict(vms)})

            result = await restore_dead(node, cluster=self.store, restorer=_Restorer(self),
                                        notify=notify)
            return result.to_json()

        op = self.d.ops.start("restore-dead", None, work)
        log.warning("cluster: node %s is dead: restoring its mirrored VMs (operation %s)",
                    node, op.id)

    def _drain_requested(self, request: k.DrainRequest) -> None:
        """``ferry node drain`` (the drain key) asks for an evacuation of this node."""
        op = self.drain(request.deadline_at, request.reason)
        log.warning("cluster: drain requested: evacuation %s (deadline in %.0f s)",
                    op.id, request.deadline_at - time.time())

    # -- evacuation ----------------------------------------------------------------

    async def on_notice(self, notice: Notice) -> None:
        """A provider's spot notice (:mod:`ferry.daemon.spot`): evacuate this node before
        the notice's deadline, and return once the evacuation ended (Azure's notice is
        acknowledged then: an acknowledgement lets the provider act at once)."""
        op = self.drain(notice.deadline.timestamp(), k.CordonReason.NOTICE)
        log.warning("cluster: %s notice (%s): evacuation %s, deadline in %.0f s",
                    notice.provider, notice.action, op.id, notice.seconds_left())
        await self.d.ops.wait(op.id, max(notice.seconds_left(), 0.0) + NOTICE_GRACE_S)

    def drain(self, deadline_at: float, reason: k.CordonReason = k.CordonReason.DRAIN,
              ) -> Operation:
        """Start evacuating this node (an operation of kind ``evacuate``); the running
        one's if one runs. This is what a provider's notice calls too."""
        if self.evacuation is not None:
            op = self.d.ops.get(self.evacuation)
            if op is not None and op.state.value == "running":
                return op
        me = self.config.node_name

        async def work(op_id: str) -> dict[str, Any]:
            vms: dict[str, str] = {}

            def notify(kind: str, data: dict[str, Any]) -> None:
                self.d.events.publish("evacuation", step=kind, operation=op_id, **data)
                if kind in ("vm-moved", "vm-packaged", "vm-failed"):
                    self.d.metrics.evacuated_vms.labels(kind.removeprefix("vm-")).inc()
                if "vm" in data:  # the operation's progress: each VM's last step
                    vms[data["vm"]] = kind.removeprefix("vm-") + (
                        f" to {data['to']}" if kind == "vm-moving" else "")
                    self.d.ops.report(op_id, {"deadline_at": deadline_at, "vms": dict(vms)})

            pace = observed_bytes_per_s(await asyncio.to_thread(self._past_migrations),
                                        default=DEFAULT_BYTES_PER_S)
            result = await evacuate(me, deadline_at, cluster=self.store,
                                    mover=_Mover(self, op_id), bytes_per_s=pace,
                                    reason=reason, op_id=f"evac-{me}-{op_id}",
                                    max_parallel=self.config.max_parallel_out,
                                    notify=notify)
            await self._drained(result)
            return result.to_json()

        op = self.d.ops.start("evacuate", None, work)
        self.evacuation = op.id
        return op

    def _past_migrations(self) -> list[tuple[int, float]]:
        """(bytes, seconds) of the last :data:`PACE_SAMPLES` migrations that succeeded
        here (the host's history file: blocking, call it in a thread)."""
        out = []
        for r in self.d.history.history.records()[-PACE_SAMPLES:]:
            summary = r.summary or {}
            sent = summary.get("bytes_total")
            if r.state == "succeeded" and isinstance(sent, int) and r.finished:
                out.append((sent, r.finished - r.started))
        return out

    async def _drained(self, result: EvacuationResult) -> None:
        self.d.metrics.evacuations.labels("complete" if result.complete
                                          else "incomplete").inc()
        with contextlib.suppress(FerryError):
            await self.store.delete(k.key(k.DRAIN, self.config.node_name))


class _Restorer:
    """A dead node's VM resumed on a target from its mirror (``POST /v1/restores``)."""

    def __init__(self, c: DaemonCluster) -> None:
        self.c = c

    async def restore(self, placement: k.Placement, target: k.NodeRecord,
                      mirror_to: dict[str, Any]) -> dict[str, Any]:
        assert placement.mirror is not None
        source = placement.mirror
        body = {"url": source.get("url"), "name": placement.vm,
                "endpoint_url": source.get("endpoint_url"), "region": source.get("region"),
                "profile": source.get("profile"),
                "mirror": {key: mirror_to.get(key) for key in
                           ("url", "interval_s", "endpoint_url", "region", "profile")}}
        peer = self.c.peers.client(target.api)
        try:
            op = await asyncio.to_thread(peer.call, "POST", "/v1/restores", body,
                                         timeout_s=RECEIVER_TIMEOUT_S)
            done = await asyncio.to_thread(peer.wait, op, timeout_s=RESTORE_TIMEOUT_S)
        except (OSError, DaemonError) as exc:
            raise RestoreError(f"{target.name} did not restore it: {exc}",
                               node=target.name) from None
        if done.get("state") != "succeeded":
            raise RestoreError(f"{target.name} did not restore it: {done.get('error')}",
                               node=target.name)
        result = done.get("result")
        return result if isinstance(result, dict) else {}


class _Mover:
    """The evacuation's moves through this daemon: receivers on targets, migrate_out."""

    def __init__(self, c: DaemonCluster, op_id: str) -> None:
        self.c = c
        self.d = c.d
        self.op_id = op_id

    async def local_vms(self) -> list[VMDemand]:
        return [VMDemand(v.vm, v.memory_bytes) for v in await self.c.local_vms()
                if v.status == "running"]

    async def move(self, vm: VMDemand, target: k.NodeRecord, *,
                   timeout_s: float) -> dict[str, Any]:
        peer = self.c.peers.client(target.api)
        try:
            recv = await asyncio.to_thread(
                peer.call, "POST", "/v1/receivers",
                {"listen": f"{target.address}:0", "name": vm.vm},
                timeout_s=min(RECEIVER_TIMEOUT_S, timeout_s))
        except (OSError, DaemonError) as exc:
            raise EvacuationError(f"no receiver on {target.name}: {exc}",
                                  node=target.name) from None
        host, port = recv["address"]
        try:
            done = await migrate_out(self.d, vm.vm, self.op_id, MigrateRequest(
                to=(host, int(port)), access=Access(token=recv.get("token")),
                timeout_s=max(1.0, min(timeout_s, 3600.0))), report=False)
        except FerryError:
            with contextlib.suppress(OSError, FerryError):  # the receiver waits no more
                await asyncio.to_thread(peer.call, "DELETE", f"/v1/vms/{vm.vm}?force=true",
                                        timeout_s=10)
            raise
        s = done["summary"]
        downtime = s.get("downtime_corrected_ms")
        return {"downtime_ms": s.get("downtime_source_view_ms") if downtime is None
                else downtime,
                "bytes_total": s.get("bytes_total"), "migration": done["migration"]}

    async def package(self, vm: VMDemand) -> str:
        file = self.d.host.state_root / "evacuated" / f"{vm.vm}-{int(time.time())}.ferry"
        await asyncio.to_thread(file.parent.mkdir, parents=True, exist_ok=True)
        key = self.d.host.signing_key
        async with self.d.lock(vm.vm):
            reply = await self.d.client(vm.vm).migrate(MigrateRequest(
                package=file, key=key, overwrite=True))
            await self.d.wait_gone(vm.vm)
        assert isinstance(reply, ExportReply)
        return str(reply.package)
