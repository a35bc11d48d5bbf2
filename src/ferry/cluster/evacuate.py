"""Move every VM off a node before a deadline: :func:`evacuate`.

This is the one entry point for a drain (``ferry node drain``, ``POST /v1/node/drain``)
and for a provider's preemption notice (the watchers of :mod:`ferry.spot` call it with
the notice's deadline). Theory of operation:

1. The node is **cordoned** (nothing new lands on it) and the evacuation becomes an
   operation record (``/ferry/operations/<id>``).
2. Its VMs are put in :func:`~ferry.cluster.scheduler.evacuation_order`: largest first
   if the estimate says all fit in the window, else smallest first.
3. Up to ``max_parallel`` live migrations run at once. Each VM's target is picked when
   it starts (:func:`~ferry.cluster.scheduler.pick_target` over a fresh view of the
   cluster plus this evacuation's own bookings, :class:`~ferry.cluster.scheduler.Ledger`),
   so the VMs spread over the targets and no target gets more than its
   ``max_incoming``. A migration is given the time left minus what the VM's fallback
   would take (``package_reserve_s``): migrate's own timeout cancels it before the
   hand-off, so the VM stays on the source.
4. A migration that fails (the target died, refused, or timed out before the hand-off)
   leaves the VM here; it is retried on another target (the failed one is excluded for
   this VM) while time allows.
5. A VM that fits nowhere, or has no time left for a live migration, is **snapshotted
   into a package** (:meth:`Mover.package`), and the result says so and why.

The evacuation never raises for one VM's failure: the :class:`EvacuationResult` says,
VM by VM, ``moved`` (where, downtime, attempts), ``packaged`` (where the package is,
why) or ``failed`` (why). Cancellation is not swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ferry.cluster import keys as k
from ferry.cluster.scheduler import (
    MIB,
    Ledger,
    NodeView,
    VMDemand,
    evacuation_order,
    pick_target,
)
from ferry.errors import FerryError

log = logging.getLogger(__name__)

DEFAULT_MAX_PARALLEL = 4
DEFAULT_BYTES_PER_S = 100 * MIB
"""A live migration's pace for the order's estimate: TCG guests on shared cores copy
about 100-300 MiB/s here (docs/live-migration.md); the low end, so the estimate errs
towards smallest-first."""
MIN_MOVE_S = 2.0
"""Less time than this left for a live migration: go straight to the package."""
MAX_ATTEMPTS = 3
"""Targets one VM is tried on before it is packaged."""


def package_reserve_s(vm: VMDemand) -> float:
    """Time kept back for a VM's fallback snapshot: it writes guest RAM to local disk
    (a few hundred MiB/s) after a pause."""
    return 2.0 + vm.memory_bytes / (200 * MIB)


class ClusterOps(Protocol):
    """What an evacuation needs of the cluster (:class:`~ferry.cluster.store.ClusterStore`
    in a daemon; an in-memory fake in unit tests)."""

    async def cordon(self, node: str, reason: k.CordonReason, detail: str = "") -> None: ...

    async def views(self) -> tuple[dict[str, NodeView], dict[str, k.NodeRecord]]: ...

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> None: ...


class Mover(Protocol):
    """How VMs leave this node (the daemon's migrate and snapshot paths)."""

    async def local_vms(self) -> list[VMDemand]: ...

    async def move(self, vm: VMDemand, target: k.NodeRecord, *,
                   timeout_s: float) -> dict[str, Any]:
        """Live-migrate ``vm`` to ``target``; the migration summary's figures once the VM
        runs there. FerryError if it did not (then the VM still runs here)."""
        ...

    async def package(self, vm: VMDemand) -> str:
        """Stop ``vm`` into a package another node can resume; where it is."""
        ...


@dataclass
class EvacuationResult:
    id: str
    node: str
    reason: str
    started_at: float
    deadline_at: float
    order: str = ""
    estimate_bytes_per_s: int = 0
    """The pace the order's estimate assumed (past migrations here, else the default)."""
    finished_at: float | None = None
    moved: list[dict[str, Any]] = field(default_factory=list)
    packaged: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every VM left this node (live or as a package)."""
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete,
                "elapsed_s": None if self.finished_at is None
                else round(self.finished_at - self.started_at, 3),
                "within_deadline": None if self.finished_at is None
                else self.finished_at <= self.deadline_at}


Notify = Callable[[str, dict[str, Any]], None]


async def evacuate(node: str, deadline_at: float, *, cluster: ClusterOps, mover: Mover,
                   reason: k.CordonReason = k.CordonReason.DRAIN, op_id: str | None = None,
                   max_parallel: int = DEFAULT_MAX_PARALLEL,
                   bytes_per_s: float = DEFAULT_BYTES_PER_S,
                   notify: Notify = lambda kind, data: None,
                   clock: Callable[[], float] = time.time) -> EvacuationResult:
    """Cordon ``node`` and move every VM it holds to other nodes before ``deadline_at``
    (wall-clock Unix seconds); see the module's docstring. ``notify(kind, data)`` is
    told of each step (``vm-moving``, ``vm-moved``, ``vm-retry``, ``vm-packaged``,
    ``vm-failed``) for events and metrics."""
    started = clock()
    result = EvacuationResult(op_id or f"evac-{node}-{int(started * 1000)}", node,
                              reason.value, started, deadline_at)
    try:
        await cluster.cordon(node, reason, f"evacuation {result.id}")
    except FerryError as exc:  # etcd away: the VMs must still leave (as packages)
        log.warning("evacuation %s: could not cordon %s (%s)", result.id, node, exc)
    await _record(cluster, result, k.OpState.RUNNING)
    vms = await mover.local_vms()
    order, queue = evacuation_order(vms, window_s=max(deadline_at - started, 0.0),
                                    lanes=max_parallel, bytes_per_s=bytes_per_s)
    result.order = order.value
    result.estimate_bytes_per_s = round(bytes_per_s)
    notify("evacuation-started", {"id": result.id, "node": node, "order": order.value,
                                  "vms": [v.vm for v in queue]})
    ledger = Ledger()
    excluded: dict[str, set[str]] = {v.vm: {node} for v in queue}
    attempts: dict[str, int] = {v.vm: 0 for v in queue}
    wake = asyncio.Event()
    pending = list(queue)

    async def fallback(vm: VMDemand, why: str) -> None:
        try:
            where = await mover.package(vm)
        except Exception as exc:  # one VM's failure must not stop the others leaving
            if not isinstance(exc, FerryError):
                log.exception("evacuation %s: packaging %s failed", result.id, vm.vm)
            result.failed.append({"vm": vm.vm, "error": str(exc) or type(exc).__name__,
                                  "why": why})
            notify("vm-failed", {"vm": vm.vm, "error": str(exc)})
            return
        result.packaged.append({"vm": vm.vm, "package": where, "reason": why,
                                "attempts": attempts[vm.vm],
                                "at_s": round(clock() - started, 3)})
        notify("vm-packaged", {"vm": vm.vm, "package": where, "reason": why})

    async def move(vm: VMDemand, target: k.NodeRecord, timeout_s: float) -> None:
        try:
            await move_once(vm, target, timeout_s)
        finally:
            wake.set()  # the loop looks again: a slot freed, or a VM to retry

    async def move_once(vm: VMDemand, target: k.NodeRecord, timeout_s: float) -> None:
        mig = k.MigrationRecord(f"{result.id}-{vm.vm}-{attempts[vm.vm]}", vm.vm, node,
                                target.name, k.OpState.RUNNING, clock())
        await _put_quietly(cluster, k.key(k.MIGRATIONS, mig.id), k.encode(mig))
        notify("vm-moving", {"vm": vm.vm, "to": target.name, "attempt": attempts[vm.vm]})
        try:
            summary = await mover.move(vm, target, timeout_s=timeout_s)
        except Exception as exc:  # the VM is still here (before the hand-off)
            if not isinstance(exc, FerryError):
                log.exception("evacuation %s: moving %s to %s failed", result.id, vm.vm,
                              target.name)
            ledger.release(vm.vm, landed=False)
            excluded[vm.vm].add(target.name)
            await _put_quietly(cluster, k.key(k.MIGRATIONS, mig.id), k.encode(
                k.MigrationRecord(**{**asdict(mig), "state": k.OpState.FAILED,
                                     "finished": clock(), "error": str(exc)})))
            notify("vm-retry", {"vm": vm.vm, "target": target.name, "error": str(exc)})
            pending.insert(0, vm)  # next in line: it has waited longest
            return
        ledger.release(vm.vm, landed=True)
        now = clock()
        await _put_quietly(cluster, k.key(k.MIGRATIONS, mig.id), k.encode(
            k.MigrationRecord(**{**asdict(mig), "state": k.OpState.SUCCEEDED,
                                 "finished": now})))
        await _put_quietly(cluster, k.key(k.VMS, vm.vm), k.encode(
            k.Placement(vm.vm, target.name, vm.memory_bytes, "running", now)))
        result.moved.append({"vm": vm.vm, "to": target.name, "attempts": attempts[vm.vm],
                             "at_s": round(now - started, 3), **summary})
        notify("vm-moved", {"vm": vm.vm, "to": target.name, **summary})

    async with asyncio.TaskGroup() as tg:
        while pending or ledger.inflight:
            wake.clear()
            while pending and ledger.inflight < max_parallel:
                vm = pending[0]
                left = deadline_at - clock() - package_reserve_s(vm)
                if left < MIN_MOVE_S or attempts[vm.vm] >= MAX_ATTEMPTS:
                    pending.pop(0)
                    why = "no time left for a live migration" if left < MIN_MOVE_S \
                        else f"failed on {attempts[vm.vm]} targets"
                    tg.create_task(fallback(vm, why))
                    continue
                target, why = await _target(cluster, ledger, vm, excluded[vm.vm])
                if target is None:
                    if ledger.inflight:
                        break  # a target may free an incoming slot: wait for one to end
                    pending.pop(0)
                    tg.create_task(fallback(vm, why))
                    continue
                pending.pop(0)
                attempts[vm.vm] += 1
                ledger.reserve(vm, target.name)
                tg.create_task(move(vm, target, left))
            if ledger.inflight or pending:
                await wake.wait()
    result.finished_at = clock()
    await _record(cluster, result, k.OpState.SUCCEEDED if result.complete
                  else k.OpState.FAILED)
    notify("evacuation-finished", result.to_json())
    return result


FITS_NOWHERE = "fits on no node"
NO_VIEW = "no view of the cluster (etcd unreachable)"


async def _target(cluster: ClusterOps, ledger: Ledger, vm: VMDemand,
                  exclude: set[str]) -> tuple[k.NodeRecord | None, str]:
    """A target for ``vm``, or None and why not."""
    try:
        views, records = await cluster.views()
    except FerryError as exc:  # etcd away: no target can be trusted now
        log.warning("evacuation: no view of the cluster (%s)", exc)
        return None, NO_VIEW
    picked = pick_target(ledger.apply(views.values()), vm, exclude=exclude)
    return (None, FITS_NOWHERE) if picked is None else (records[picked.name], "")


async def _record(cluster: ClusterOps, result: EvacuationResult, state: k.OpState) -> None:
    rec = k.OperationRecord(result.id, "evacuate", result.node, state, result.started_at,
                            result.deadline_at, result.finished_at,
                            None if state is k.OpState.RUNNING else result.to_json())
    await _put_quietly(cluster, k.key(k.OPERATIONS, result.id), k.encode(rec))


async def _put_quietly(cluster: ClusterOps, key: bytes, value: bytes) -> None:
    """Records are for the cluster to see; etcd being away must not stop VMs leaving."""
    try:
        await cluster.put(key, value)
    except FerryError as exc:
        log.warning("evacuation: could not record %s (%s)", key.decode(), exc)
