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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ferry.latency import BUCKETS_MS

DOWNTIME_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


VMSample = dict[str, Any]
"""One VM at scrape time: ``vm_id``, ``status``, ``memory_bytes``, ``started_at``,
``qemu`` (QEMU's CPU use, :func:`ferry.vm.runner.process_usage`), and from the holder's
last status ``memory_io`` (guest RAM through FUSE), ``disk_io`` (NBD per disk) and
``vitals`` (:mod:`ferry.node.vitals`)."""


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
        fuse_writes = CounterMetricFamily("ferry_vm_fuse_writes",
                                          "Guest RAM writes (writeback) through the FUSE daemon",
                                          labels=["vm"])
        fuse_wbytes = CounterMetricFamily("ferry_vm_fuse_write_bytes",
                                          "Guest RAM bytes written back through the FUSE daemon",
                                          labels=["vm"])
        nbd_ops = CounterMetricFamily("ferry_vm_nbd_requests",
                                      "NBD requests QEMU sent for a disk, by kind",
                                      labels=["vm", "disk", "op"])
        nbd_bytes = CounterMetricFamily("ferry_vm_nbd_bytes",
                                        "Bytes QEMU read from or wrote to a disk over NBD",
                                        labels=["vm", "disk", "direction"])
        agent_up = GaugeMetricFamily("ferry_vm_agent_up",
                                     "1 while the guest agent answered a ping in the last 15 s",
                                     labels=["vm"])
        agent_rtt = GaugeMetricFamily("ferry_vm_agent_rtt_seconds",
                                      "Round trip of the last agent ping", labels=["vm"])
        rpo = GaugeMetricFamily("ferry_vm_mirror_recovery_point_seconds",
                                "Age of the last complete checkpoint of the VM's S3 mirror "
                                "(since the mirror started, if none yet)", labels=["vm"])
        rpo_failures = CounterMetricFamily("ferry_vm_mirror_failures",
                                           "Mirror checkpoints that failed (S3 errors)",
                                           labels=["vm"])
        dirty = GaugeMetricFamily("ferry_vm_memory_dirty_bytes_per_second",
                                  "Guest RAM dirty rate (QEMU's page sampling, every 30 s)",
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
                fuse_writes.add_metric([vm], io.get("writes", 0))
                fuse_wbytes.add_metric([vm], io.get("bytes_written", 0))
            for disk, c in sorted((v.get("disk_io") or {}).items()):
                for op, key in (("read", "reads"), ("write", "writes"), ("flush", "flushes")):
                    nbd_ops.add_metric([vm, disk, op], c.get(key, 0))
                nbd_bytes.add_metric([vm, disk, "read"], c.get("read_bytes", 0))
                nbd_bytes.add_metric([vm, disk, "write"], c.get("write_bytes", 0))
            mirror = v.get("mirror")
            if mirror:
                # From the checkpoint's time, not the polled age: the age grows between polls.
                since = mirror.get("last_checkpoint_unix_s") or mirror["started_unix_s"]
                rpo.add_metric([vm], max(0.0, time.time() - since))
                rpo_failures.add_metric([vm], mirror["failures"])
            vitals = v.get("vitals") or {}
            if "agent_up" in vitals:
                agent_up.add_metric([vm], 1 if vitals["agent_up"] else 0)
            if vitals.get("agent_rtt_ms") is not None:
                agent_rtt.add_metric([vm], vitals["agent_rtt_ms"] / 1e3)
            if vitals.get("dirty_rate_mib_s") is not None:
                dirty.add_metric([vm], vitals["dirty_rate_mib_s"] * (1 << 20))
        yield from (up, memory, uptime, cpu, fuse_reads, fuse_bytes, fuse_writes, fuse_wbytes,
                    nbd_ops, nbd_bytes, agent_up, agent_rtt, dirty, rpo, rpo_failures)
        yield GaugeMetricFamily("ferry_node_memory_committed_bytes",
                                "Guest RAM of the VMs running on this node",
                                value=self._committed())


class _MigrationCollector(Collector):
    """Running migrations' phases, and the post-copy fault latencies of past ones (their
    summaries carry bucket counts, not samples: the histogram is built from those)."""

    def __init__(self, running: Callable[[], Sequence[tuple[str, str]]]) -> None:
        self._running = running
        self.fault_buckets = [0] * (len(BUCKETS_MS) + 1)
        self.fault_sum_s = 0.0

    def observe_faults(self, buckets: Sequence[int], sum_s: float) -> None:
        if len(buckets) == len(self.fault_buckets):
            self.fault_buckets = [a + b for a, b in zip(self.fault_buckets, buckets,
                                                        strict=True)]
            self.fault_sum_s += sum_s

    def collect(self) -> Iterator[Metric]:
        phase = GaugeMetricFamily("ferry_migration_phase",
                                  "1 for each outgoing migration running, by its phase",
                                  labels=["vm", "phase"])
        for vm, p in self._running():
            phase.add_metric([vm, p], 1)
        yield phase
        cumulative, total = [], 0
        for bound, count in zip([*(b / 1e3 for b in BUCKETS_MS), float("inf")],
                                self.fault_buckets, strict=True):
            total += count
            cumulative.append((str(bound) if bound != float("inf") else "+Inf", total))
        yield HistogramMetricFamily(
            "ferry_migration_postcopy_fault_latency_seconds",
            "How long the destination VM's reads waited for a block still in flight",
            buckets=cumulative, sum_value=self.fault_sum_s)


class Metrics:
    """One registry per daemon (no process-global state: tests run several)."""

    def __init__(self, vms: Callable[[], Sequence[VMSample]],
                 committed: Callable[[], int],
                 running_migrations: Callable[[], Sequence[tuple[str, str]]] = list) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_VMCollector(vms, committed))
        self.migrations = _MigrationCollector(running_migrations)
        self.registry.register(self.migrations)
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
        self.cluster_up = Gauge("ferry_cluster_up",
                                "1 while this node reaches etcd and is registered",
                                registry=self.registry)
        self.cluster_retries = Counter("ferry_cluster_retries",
                                       "Times this node lost etcd and backed off to retry",
                                       registry=self.registry)
        self.dead_nodes = Counter("ferry_cluster_dead_nodes",
                                  "Nodes this node marked dead (their lease expired)",
                                  registry=self.registry)
        self.restored_vms = Counter("ferry_cluster_restored_vms",
                                    "VMs of dead nodes this node handled: restored "
                                    "(elsewhere, from their mirror) or lost",
                                    ["outcome"], registry=self.registry)
        self.evacuations = Counter("ferry_evacuations",
                                   "Evacuations of this node finished, by outcome",
                                   ["outcome"], registry=self.registry)
        self.evacuated_vms = Counter("ferry_evacuation_vms",
                                     "VMs evacuations handled: moved, packaged, failed",
                                     ["outcome"], registry=self.registry)
        self.phase_bytes = Counter("ferry_migration_phase_bytes",
                                   "Bytes outgoing live migrations sent, by phase",
                                   ["phase"], registry=self.registry)
