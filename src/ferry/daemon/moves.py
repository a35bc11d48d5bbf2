"""Moving a VM out of this node through its holder: the migrate route's work, shared with
the cluster's evacuation (:mod:`ferry.daemon.cluster`).

:func:`migrate_out` runs one outgoing live migration under the VM's lock, reports the
holder's progress on the operation and in ``/v1/migrations``, records the summary in
the metrics, and returns once the VM has left this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from ferry.aio import cancel_and_wait
from ferry.daemon.metrics import Metrics
from ferry.daemon.operations import Operations
from ferry.daemon.state import Daemon
from ferry.errors import FerryError
from ferry.live.summary import MigrationSummary
from ferry.node.control import ControlClient, ExportReply, MigrateRequest

PROGRESS_EVERY_S = 0.25


async def migrate_out(d: Daemon, vm_id: str, op_id: str, req: MigrateRequest, *,
                      report: bool = True) -> dict[str, Any]:
    """Live-migrate ``vm_id`` as ``req`` says (``req.to`` set) within operation ``op_id``
    (its ``progress`` follows the migration's unless ``report`` is off: an evacuation
    runs several at once); its summary and migration record id once the VM left this
    node. FerryError if it failed (then, before the hand-off, the VM still runs here)."""
    assert req.to is not None
    client = d.client(vm_id)
    mig_id = d.history.start(op_id, vm_id, f"{req.to[0]}:{req.to[1]}")
    req = dataclasses.replace(req, migration_id=mig_id)
    try:
        async with d.lock(vm_id):
            # Owned here and always awaited: cancelled once the migration ended.
            watch = asyncio.create_task(_watch_progress(client, d, op_id if report else None,
                                                        mig_id))
            try:
                reply = await client.migrate(req)
            finally:
                await cancel_and_wait(watch, swallow_errors=True)
    finally:
        d.history.finish(mig_id)  # the holder recorded how it ended
    assert not isinstance(reply, ExportReply)
    _observe(d.metrics, reply.summary)
    # The operation ends once the VM has left this node (its holder answers before its
    # own cleanup is done).
    await d.wait_gone(vm_id)
    return {"summary": reply.summary.to_json(), "migration": mig_id}


async def _watch_progress(client: ControlClient, d: Daemon, op_id: str | None,
                          mig_id: str) -> None:
    """Report the holder's migration progress on the operation and the migration record
    until cancelled."""
    ops: Operations = d.ops
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        with contextlib.suppress(FerryError):
            status = await client.status()
            if status.migration is not None:
                if op_id is not None:
                    ops.report(op_id, dict(status.migration))
                d.history.progress(mig_id, dict(status.migration))


def _observe(metrics: Metrics, summary: MigrationSummary) -> None:
    ms = summary.downtime.corrected_ms if summary.downtime.corrected_ms is not None \
        else summary.downtime.source_view_ms
    if ms is not None:
        metrics.migration_downtime.observe(ms / 1e3)
    if summary.bytes_total is not None:
        metrics.migration_bytes.inc(summary.bytes_total)
    if summary.postcopy_fetches is not None:
        metrics.postcopy_fetches.inc(summary.postcopy_fetches)
    for device in summary.devices.values():
        for phase, n in device.bytes_by_phase.items():
            metrics.phase_bytes.labels(phase).inc(n)
    if summary.faults:
        metrics.migrations.observe_faults(summary.fault_latency_buckets,
                                          (summary.fault_latency_ms_sum or 0.0) / 1e3)
