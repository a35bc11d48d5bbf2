"""A dead node's mirrored VMs, brought back on the nodes that live: :func:`restore_dead`.

A node whose lease expired is marked dead by exactly one member (the transaction
of :meth:`~ferry.cluster.store.ClusterStore.mark_dead_if_alive`); that member then
calls :func:`restore_dead`. For every VM whose placement key still names the dead
node:

* **Mirrored** (:attr:`~ferry.cluster.keys.Placement.mirror`, set by a node for a VM
  run with a mirror): a target is picked as an evacuation picks one
  (:func:`~ferry.cluster.scheduler.pick_target` over a fresh view plus this
  restore's own bookings; never the dead node, never a cordoned one). The placement
  key is taken in one transaction (it must still name the dead node: a node that
  was only cut off and came back keeps its VMs), then the target resumes the VM
  from its mirror's last complete checkpoint (:meth:`Restorer.restore`: ``POST
  /v1/restores`` on the target), mirrored on to a new prefix beside the old one
  (:func:`next_prefix`: the old prefix stays as the record of what the dead node
  left, never written again). A target that fails is excluded for that VM and the
  next one tried, up to :data:`MAX_ATTEMPTS`; a VM that found no target has its
  placement put back naming the dead node with status ``lost``.
* **Not mirrored**: nothing of it survives the node; the result lists it as ``lost``.

The VMs are restored one after the other: a restore is a few seconds (the guest
runs before its RAM is fetched), and one at a time keeps the targets' bookings
exact. One VM's failure never stops the others; cancellation is not swallowed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from ferry.cluster import keys as k
from ferry.cluster.membership import RESTORING
from ferry.cluster.scheduler import Ledger, NodeView, VMDemand, pick_target
from ferry.errors import FerryError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Targets one VM is tried on before it is given up."""
LOST = "lost"
"""A placement's status once its node died and nothing could bring it back."""


class ClusterOps(Protocol):
    """What a restore needs of the cluster (:class:`~ferry.cluster.store.ClusterStore`
    in a daemon; an in-memory fake in unit tests)."""

    async def records(self, prefix: str, cls: type[k.Placement]) -> dict[str, k.Placement]:
        ...

    async def views(self) -> tuple[dict[str, NodeView], dict[str, k.NodeRecord]]: ...

    async def replace_placement(self, vm: str, on: str, new: k.Placement) -> bool: ...


class Restorer(Protocol):
    async def restore(self, placement: k.Placement, target: k.NodeRecord,
                      mirror_to: dict[str, Any]) -> dict[str, Any]:
        """Resume ``placement``'s VM on ``target`` from ``placement.mirror``, mirrored on
        to ``mirror_to``; its ready report once it runs there. FerryError if it did
        not."""
        ...


@dataclass
class RestoreResult:
    node: str
    """The dead node."""
    started_at: float
    finished_at: float | None = None
    restored: list[dict[str, Any]] = field(default_factory=list)
    """``{vm, to, from, mirror_to, attempts, checkpoint_age_s}``."""
    lost: list[dict[str, Any]] = field(default_factory=list)
    """``{vm, reason}``: not mirrored, or no node took it."""
    skipped: list[str] = field(default_factory=list)
    """VMs whose placement changed before it was taken (someone else has them)."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "elapsed_s": None if self.finished_at is None
                else round(self.finished_at - self.started_at, 3)}


Notify = Callable[[str, dict[str, Any]], None]


def next_prefix(url: str, *, now: float) -> str:
    """The prefix a restored VM is mirrored on to: ``s3://B/P`` -> ``s3://B/P-r<unix s>``
    (a second restore of it appends again; each is a new, empty prefix)."""
    return f"{url.rstrip('/')}-r{int(now)}"


async def restore_dead(node: str, *, cluster: ClusterOps, restorer: Restorer,
                       notify: Notify = lambda kind, data: None,
                       clock: Callable[[], float] = time.time) -> RestoreResult:
    """Bring back every mirrored VM the dead ``node`` held (see the module docstring)."""
    result = RestoreResult(node, clock())
    placed = await cluster.records(k.VMS, k.Placement)
    ledger = Ledger()
    for vm, p in sorted(placed.items()):
        if p.node != node or p.status == LOST:
            continue
        if p.mirror is None:
            result.lost.append({"vm": vm, "reason": "not mirrored"})
            notify("vm-lost", {"vm": vm, "reason": "not mirrored"})
            continue
        await _restore_one(p, node, cluster=cluster, restorer=restorer, ledger=ledger,
                           result=result, notify=notify, clock=clock)
    result.finished_at = clock()
    return result


async def _restore_one(p: k.Placement, dead: str, *, cluster: ClusterOps,
                       restorer: Restorer, ledger: Ledger, result: RestoreResult,
                       notify: Notify, clock: Callable[[], float]) -> None:
    assert p.mirror is not None
    vm = VMDemand(p.vm, p.memory_bytes)
    mirror_to = {**p.mirror, "url": next_prefix(str(p.mirror["url"]), now=clock())}
    tried: set[str] = {dead}
    holder = dead  # whom the placement key names now
    why = "fits on no node"
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            views, records = await cluster.views()
        except FerryError as exc:
            why = f"no view of the cluster ({exc})"
            break
        picked = pick_target(ledger.apply(views.values()), vm, exclude=tried)
        if picked is None:
            why = "fits on no node"
            break
        target = records[picked.name]
        taking = replace(p, node=target.name, status=RESTORING, updated=clock(),
                         mirror=mirror_to)
        if not await cluster.replace_placement(p.vm, holder, taking):
            result.skipped.append(p.vm)
            notify("vm-skipped", {"vm": p.vm, "reason": "its placement changed"})
            return
        holder = target.name
        ledger.reserve(vm, target.name)
        notify("vm-restoring", {"vm": p.vm, "to": target.name, "from": p.mirror["url"]})
        try:
            ready = await restorer.restore(p, target, mirror_to)
        except FerryError as exc:
            ledger.release(p.vm, landed=False)
            tried.add(target.name)
            why = f"{target.name}: {exc}"
            log.warning("restore of %s on %s failed (%s)", p.vm, target.name, exc)
            notify("vm-retry", {"vm": p.vm, "to": target.name, "error": str(exc)})
            continue
        ledger.release(p.vm, landed=True)
        restored_from = ready.get("restored_from") or {}
        entry = {"vm": p.vm, "to": target.name, "from": p.mirror["url"],
                 "mirror_to": mirror_to["url"], "attempts": attempt,
                 "checkpoint_age_s": restored_from.get("age_s")}
        result.restored.append(entry)
        notify("vm-restored", entry)
        return
    # Nobody took it: the key names the dead node again, as lost.
    lost = replace(p, status=LOST, updated=clock())
    try:
        await cluster.replace_placement(p.vm, holder, lost)
    except FerryError as exc:
        log.warning("could not mark %s lost (%s)", p.vm, exc)
    result.lost.append({"vm": p.vm, "reason": why})
    notify("vm-lost", {"vm": p.vm, "reason": why})
