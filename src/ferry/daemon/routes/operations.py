"""``/v1/operations`` (long operations: poll, cancel) and ``/v1/migrations`` (the
outgoing migrations this node started: live progress, then their outcome; kept across
daemon restarts by :mod:`ferry.daemon.history`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query

from ferry.daemon import models as m
from ferry.daemon.problems import Problem
from ferry.daemon.state import Daemon


def routes(d: Daemon) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/operations", response_model=list[m.Operation], tags=["operations"])
    async def list_operations() -> list[m.Operation]:
        return d.ops.all()

    @r.get("/v1/operations/{op_id}", response_model=m.Operation, tags=["operations"])
    async def get_operation(op_id: str, wait_s: float = 0.0) -> m.Operation:
        """``?wait_s=N`` (at most 60) answers as soon as the operation finished."""
        op = await d.ops.wait(op_id, min(max(wait_s, 0.0), 60.0))
        if op is None:
            raise Problem(404, "operation-not-found", "Operation not found",
                          f"no operation {op_id!r}")
        return op

    @r.delete("/v1/operations/{op_id}", response_model=m.Operation, tags=["operations"])
    async def cancel_operation(op_id: str) -> m.Operation:
        op = await d.ops.cancel(op_id)
        if op is None:
            raise Problem(404, "operation-not-found", "Operation not found",
                          f"no operation {op_id!r}")
        return op

    @r.get("/v1/migrations", response_model=list[m.Migration], tags=["migrations"])
    async def list_migrations(vm: str | None = Query(default=None, max_length=40),
                              limit: int = Query(default=100, ge=1, le=500)
                              ) -> list[m.Migration]:
        """Newest first; ``?vm=ID`` only that VM's."""
        found = [g for g in reversed(await asyncio.to_thread(d.history.all))
                 if vm is None or g.vm_id == vm]
        return found[:limit]

    @r.get("/v1/migrations/{mig_id}", response_model=m.Migration, tags=["migrations"])
    async def get_migration(mig_id: str) -> m.Migration:
        found = await asyncio.to_thread(d.history.get, mig_id)
        if found is None:
            raise Problem(404, "migration-not-found", "Migration not found",
                          f"no migration {mig_id!r}")
        return found

    return r
