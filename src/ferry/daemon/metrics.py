"""The daemon's Prometheus exposition (``GET /metrics``), with ``prometheus_client``.

VM figures are read at scrape time from the host's run directory and ``/proc``
(the VM holders are separate processes), guest RAM through FUSE from each
holder's last status (the daemon asks every :data:`~ferry.daemon.state.VM_WATCH_S`);
migration figures are recorded by the daemon's own operations. Names follow
Prometheus conventions (``ferry_`` prefix, base units, ``_total`` counters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DOWNTIME_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


VMSample = dict[str, Any]
"""One VM at scrape time: ``vm_id``, ``status``, ``memory_bytes``, ``started_at``,
``qemu`` (QEMU's CPU use, :func:`ferry.vm.runner.process_usage`) and ``memory_io``
(guest RAM through FUSE, from the holder's last status)."""


class _VMCollector(Collector):
    def __init__(self, vms: Callable[[], Sequence[VMSample]],
                 committed: Callable[[], int]) -> None:
        self._vms = vms
        self._committed = committed

    def collect(self) -> Iterator[Metric]:
        vms = self._vms()
        by_state = GaugeMetricFamily("ferry_vms", "VMs on this node by state",
                                     labels=["state"])
        counts: dict[str, int] = {}
        for v in vms:
            counts[v["status"]] = counts.get(v["status"], 0) + 1
        for state in sorted(set(counts) | {"running"}):
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        up = GaugeMetricFamily("ferry_vm_up", "1 for each VM held on this node (its state)",
                               labels=["vm", "state"])
        memory = GaugeMetricFamily("ferry_vm_memory_bytes", "Guest RAM", labels=["vm"])
        uptime = GaugeMetricFamily("ferry_vm_uptime_seconds",
                                   "Seconds since the VM's holder started here", labels=["vm"])
        cpu = CounterMetricFamily("ferry_vm_qemu_cpu_seconds",
                                  "CPU time of the VM's QEMU (all threads)", labels=["vm"])
        fuse_reads = CounterMetricFamily("ferry_vm_fuse_reads",
                                         "Guest RAM reads served by the FUSE daemon",
                                         labels=["vm"])
        fuse_bytes = CounterMetricFamily("ferry_vm_fuse_read_bytes",
                                         "Guest RAM bytes read through the FUSE daemon",
                                         labels=["vm"])
        now = time.time()
        for v in vms:
            vm = v["vm_id"]
            up.add_metric([vm, v["status"]], 1)
            if v.get("memory_bytes"):
                memory.add_metric([vm], v["memory_bytes"])
            if v.get("started_at"):
                uptime.add_metric([vm], max(0.0, now - v["started_at"]))
            if "cpu_s" in (v.get("qemu") or {}):
                cpu.add_metric([vm], v["qemu"]["cpu_s"])
            io = v.get("memory_io") or {}
            if "reads" in io:
                fuse_reads.add_metric([vm], io["reads"])
                fuse_bytes.add_metric([vm], io.get("bytes_read", 0))
        yield from (up, memory, uptime, cpu, fuse_reads, fuse_bytes)
        yield GaugeMetricFamily("ferry_node_memory_committed_bytes",
                                "Guest RAM of the VMs running on this node",
                                value=self._committed())


class Metrics:
    """One registry per daemon (no process-global state: tests run several)."""

    def __init__(self, vms: Callable[[], Sequence[VMSample]],
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
