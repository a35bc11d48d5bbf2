"""The daemon's Prometheus exposition (``GET /metrics``), with ``prometheus_client``.

VM gauges are read from the host's run directory at scrape time (the VM holders
are separate processes); migration figures are recorded by the daemon's own
operations. Names follow Prometheus conventions (``ferry_`` prefix, base units,
``_total`` counters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ferry.vm.registry import VMInfo

DOWNTIME_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _VMCollector(Collector):
    def __init__(self, vms: Callable[[], Sequence[VMInfo]],
                 committed: Callable[[], int]) -> None:
        self._vms = vms
        self._committed = committed

    def collect(self) -> Iterator[Metric]:
        vms = self._vms()
        by_state = GaugeMetricFamily("ferry_vms", "VMs on this node by state",
                                     labels=["state"])
        counts: dict[str, int] = {}
        for v in vms:
            counts[v.status] = counts.get(v.status, 0) + 1
        for state in sorted(set(counts) | {"running"}):
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        up = GaugeMetricFamily("ferry_vm_up", "1 for each VM held on this node (its state)",
                               labels=["vm", "state"])
        for v in vms:
            up.add_metric([v.vm_id, v.status], 1)
        yield up
        yield GaugeMetricFamily("ferry_node_memory_committed_bytes",
                                "Guest RAM of the VMs running on this node",
                                value=self._committed())


class Metrics:
    """One registry per daemon (no process-global state: tests run several)."""

    def __init__(self, vms: Callable[[], Sequence[VMInfo]],
                 committed: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_VMCollector(vms, committed))
        self.operations = Counter("ferry_operations", "Operations finished, by kind and state",
                                  ["kind", "state"], registry=self.registry)
        self.migration_downtime = Histogram(
            "ferry_migration_downtime_seconds",
            "Live-migration downtime (source paused -> destination running)",
            buckets=DOWNTIME_BUCKETS_S, registry=self.registry)
        self.migration_bytes = Counter("ferry_migration_bytes",
                                       "Bytes sent by outgoing live migrations",
                                       registry=self.registry)
        self.postcopy_fetches = Counter("ferry_migration_postcopy_fetches",
                                        "Blocks fetched on demand after hand-offs",
                                        registry=self.registry)
