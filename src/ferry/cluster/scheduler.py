"""Where VMs go: pure placement logic over a snapshot of the cluster (no I/O).

Rules, for a package run and for an evacuation target alike:

* only a **schedulable** node: alive, not cordoned, not under a provider's notice;
* it must have the **free capacity**: guest RAM (``memory_bytes - memory_used_bytes``)
  and a VM slot (``vms < max_vms``);
* an evacuation target must also have a free **incoming slot** (``incoming <
  max_incoming``): each incoming migration costs the target a receiver, CPU and link;
* among the candidates, the one with the **most free memory once the VM is placed**
  (ties: fewer incoming migrations, fewer VMs, then name): one node's VMs spread over
  the targets instead of filling the emptiest one first, and a :class:`Ledger` counts
  what an evacuation already sent where, so the next pick sees it.

:func:`evacuation_order` picks the order VMs leave in; see its docstring and
``docs/cluster.md`` for why.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the scheduler sees it."""

    name: str
    memory_bytes: int
    memory_used_bytes: int
    vms: int
    max_vms: int
    max_incoming: int = 2
    incoming: int = 0
    """Migrations landing there now."""
    schedulable: bool = True
    """Alive and neither cordoned nor under notice."""

    @property
    def free_memory_bytes(self) -> int:
        return self.memory_bytes - self.memory_used_bytes

    def fits(self, memory_bytes: int) -> bool:
        return self.schedulable and self.vms < self.max_vms \
            and memory_bytes <= self.free_memory_bytes

    def can_receive(self, memory_bytes: int) -> bool:
        return self.fits(memory_bytes) and self.incoming < self.max_incoming


@dataclass(frozen=True, slots=True)
class VMDemand:
    vm: str
    memory_bytes: int


def _rank(node: NodeView, memory_bytes: int) -> tuple[int, int, int, str]:
    return (-(node.free_memory_bytes - memory_bytes), node.incoming, node.vms, node.name)


def place(nodes: Iterable[NodeView], memory_bytes: int) -> NodeView | None:
    """Where a new VM (a package run) of ``memory_bytes`` goes; None if it fits nowhere."""
    fitting = [n for n in nodes if n.fits(memory_bytes)]
    return min(fitting, key=lambda n: _rank(n, memory_bytes), default=None)


def pick_target(nodes: Iterable[NodeView], vm: VMDemand, *,
                exclude: Iterable[str] = ()) -> NodeView | None:
    """An evacuation target for ``vm`` (never one of ``exclude``: the source, targets
    that already failed it); None if no node can take it now."""
    excluded = set(exclude)
    fitting = [n for n in nodes if n.name not in excluded and n.can_receive(vm.memory_bytes)]
    return min(fitting, key=lambda n: _rank(n, vm.memory_bytes), default=None)


class Ledger:
    """An evacuation's own bookings on top of a fresh snapshot of the cluster: what it
    sent where, still in flight (incoming) or landed (memory, VM count), which the
    nodes' own records may not show yet."""

    def __init__(self) -> None:
        self._inflight: dict[str, tuple[str, int]] = {}
        self._landed: dict[str, tuple[str, int]] = {}

    def reserve(self, vm: VMDemand, node: str) -> None:
        self._inflight[vm.vm] = (node, vm.memory_bytes)

    def release(self, vm: str, *, landed: bool) -> None:
        booking = self._inflight.pop(vm, None)
        if booking is not None and landed:
            self._landed[vm] = booking

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def apply(self, nodes: Iterable[NodeView], *,
              reported: Mapping[str, Sequence[str]] | None = None) -> list[NodeView]:
        """``nodes`` with this evacuation's bookings added. ``reported``: the VMs each
        node's own record already counts (those are not added twice)."""
        out = []
        for n in nodes:
            seen = set((reported or {}).get(n.name, ()))
            incoming = sum(1 for node, _ in self._inflight.values() if node == n.name)
            mem = sum(m for vm, (node, m) in [*self._inflight.items(), *self._landed.items()]
                      if node == n.name and vm not in seen)
            count = sum(1 for vm, (node, _) in [*self._inflight.items(),
                                                 *self._landed.items()]
                        if node == n.name and vm not in seen)
            out.append(dataclasses.replace(n, incoming=n.incoming + incoming,
                                           memory_used_bytes=n.memory_used_bytes + mem,
                                           vms=n.vms + count))
        return out


class Order(enum.StrEnum):
    LARGEST_FIRST = "largest-first"
    SMALLEST_FIRST = "smallest-first"


def makespan_s(durations: Sequence[float], lanes: int) -> float:
    """When the last of ``durations`` ends if each starts in the first free of
    ``lanes`` lanes, in the order given (list scheduling)."""
    if not durations:
        return 0.0
    ends = [0.0] * max(1, lanes)
    for d in durations:
        heapq.heapreplace(ends, ends[0] + d)
    return max(ends)


def evacuation_order(vms: Sequence[VMDemand], *, window_s: float, lanes: int,
                     bytes_per_s: float, overhead_s: float = 1.0,
                     ) -> tuple[Order, list[VMDemand]]:
    """The order VMs leave a node in, and which rule chose it.

    A migration's time grows with the VM's memory (``overhead_s + memory / bytes_per_s``
    is the estimate). **Largest first** when the estimate says everything fits in the
    window: started first, the longest migrations cannot be the one that runs past the
    end, and list scheduling largest first (LPT) keeps the whole evacuation short
    (within 4/3 of the best). **Smallest first** when it does not fit: with one
    deadline for all, shortest first gets the most VMs out live; the ones left are
    snapshotted into packages, and the largest are the ones that could not have made it
    anyway."""
    def est(v: VMDemand) -> float:
        return overhead_s + v.memory_bytes / max(bytes_per_s, 1.0)

    largest = sorted(vms, key=lambda v: (-v.memory_bytes, v.vm))
    if makespan_s([est(v) for v in largest], lanes) <= window_s:
        return Order.LARGEST_FIRST, largest
    return Order.SMALLEST_FIRST, sorted(vms, key=lambda v: (v.memory_bytes, v.vm))


def observed_bytes_per_s(samples: Iterable[tuple[int, float]], *,
                         default: float) -> float:
    """The pace for :func:`evacuation_order`'s estimate from past migrations here
    ((bytes sent, seconds) each; the median, so one stalled or idle migration does not
    swing it), or ``default`` without any."""
    rates = [b / s for b, s in samples if b > 0 and s > 0]
    return statistics.median(rates) if rates else default
