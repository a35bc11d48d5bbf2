"""``/v1/node``, ``/v1/events`` (server-sent events), ``/metrics`` and ``/ui``."""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import os
import socket
from collections.abc import AsyncIterator

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import ferry
from ferry.daemon import models as m
from ferry.daemon.state import Daemon, host_memory
from ferry.qemu.accel import host_accel
from ferry.qemu.version import host_qemu_version

DASHBOARD = (importlib.resources.files("ferry.daemon") / "dashboard.html").read_text()


def routes(d: Daemon) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/node", response_model=m.Node, tags=["node"])
    async def node() -> m.Node:
        choice = await host_accel(d.host)
        total, avail = host_memory()
        vms = await asyncio.to_thread(d.vms)
        return m.Node(name=socket.gethostname(), version=ferry.__version__,
                      qemu=await host_qemu_version() or "unknown",
                      accelerator=m.Accelerator(accel=choice.accel.value, reason=choice.reason),
                      capacity=m.Capacity(cpus=os.cpu_count() or 1, memory_bytes=total,
                                          memory_available_bytes=avail),
                      vms=len(vms),
                      memory_committed_bytes=await asyncio.to_thread(d.committed_bytes),
                      warm_vms=d.warm.ready)

    @r.get("/v1/events", tags=["events"], response_class=StreamingResponse)
    async def events() -> StreamingResponse:
        """Server-sent events, one JSON object each: first ``subscribed`` (the VMs here
        now), then ``vm`` (a VM appeared, changed state or went) and ``operation`` (an
        operation started, progressed or finished)."""
        async def stream() -> AsyncIterator[bytes]:
            async with d.events.subscribe() as queue:
                # First what is here now, so a subscriber starts from a known state.
                vms = [v.model_dump(mode="json") for v in await asyncio.to_thread(d.views)]
                hello = {"seq": 0, "kind": "subscribed", "vms": vms}
                yield f"data: {json.dumps(hello)}\n\n".encode()
                while True:
                    event = await queue.get()
                    if event is None:
                        return
                    yield f"data: {json.dumps(event)}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @r.get("/ui", tags=["dashboard"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The dashboard: one static page, no data in it; its script reads everything
        through the API with the token from the URL's fragment (``/ui#token=...``)."""
        return HTMLResponse(DASHBOARD)

    @r.get("/metrics", tags=["metrics"], response_class=Response)
    async def metrics() -> Response:
        data = await asyncio.to_thread(generate_latest, d.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return r
