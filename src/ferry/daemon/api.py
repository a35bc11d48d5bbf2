"""The node daemon's HTTP API (FastAPI): every route calls what the CLI calls.

A VM is held by its own process (:mod:`ferry.node.process`, as ``ferry vm run
--detach`` starts it) and controlled over its control socket
(:mod:`ferry.node.control`), so the VMs outlive the daemon: a restarted daemon
lists them from the host's run directory. The routes are in
:mod:`ferry.daemon.routes`, one module per resource; see ``docs/daemon.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response

import ferry
from ferry.daemon import models as m
from ferry.daemon import problems, spot
from ferry.daemon.cluster import ClusterConfig, DaemonCluster, PeerAccess
from ferry.daemon.operations import Operations
from ferry.daemon.routes import cluster as cluster_routes
from ferry.daemon.routes import node, operations, packages, streams, vms
from ferry.daemon.routes import volumes as volume_routes
from ferry.daemon.state import Daemon
from ferry.hostconfig import HostConfig
from ferry.spot import METADATA_URL

API_VERSION = "v1"
MAX_BODY_BYTES = 2 * 1024 * 1024


def create_app(host: HostConfig, *, warm_holders: int = 1, warm_vms: int = 0,
               warm_prime: bool = True,
               cluster: ClusterConfig | None = None, peers: PeerAccess | None = None,
               api_auth: list[str] | None = None, spot_watch: str | None = None,
               metadata_url: str = METADATA_URL) -> FastAPI:
    """The daemon's application for ``host`` (its directories and QEMU choices), keeping
    ``warm_holders`` holder processes and ``warm_vms`` VMs of the last package run started
    ahead of need (:mod:`ferry.daemon.warm`; primed unless not ``warm_prime``); a member
    of ``cluster`` if given (calling the other nodes with ``peers``;
    :mod:`ferry.daemon.cluster`); watching provider ``spot_watch``'s metadata service
    at ``metadata_url`` for spot notices (:mod:`ferry.daemon.spot`), each of which
    drains this node out of the cluster."""
    d = Daemon(host, warm_holders=warm_holders, warm_vms=warm_vms, warm_prime=warm_prime)
    if cluster is not None:
        d.cluster = DaemonCluster(d, cluster, peers or PeerAccess(), api_auth or [])
    if spot_watch is not None:
        d.spot = spot.SpotWatch(spot_watch, d.events, d.metrics.registry,
                                base_url=metadata_url,
                                evacuate=None if d.cluster is None else d.cluster.on_notice)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as tg:
            d._ops = Operations(tg, d.events, on_finish=lambda op: d.metrics.operations.labels(
                op.kind, op.state.value).inc())
            watcher = tg.create_task(d.watch_vms(), name="watch vms")
            filler = tg.create_task(d.holders.keep_filled(), name="spare holders")
            warmer = tg.create_task(d.warm.keep_filled(), name="warm vms")
            member = None if d.cluster is None else tg.create_task(d.cluster.run(),
                                                                    name="cluster")
            spotting = None if d.spot is None else tg.create_task(d.spot.run(tg),
                                                                  name="spot watch")
            try:
                yield
            finally:
                if member is not None:
                    member.cancel()
                    await d.cluster.close()
                watcher.cancel()
                filler.cancel()
                warmer.cancel()
                if spotting is not None:
                    spotting.cancel()
                await d.holders.close()
                await d.warm.close()
                d.events.close()
                for op in d.ops.all():
                    if op.state is m.OpState.RUNNING:
                        await d.ops.cancel(op.id)

    app = FastAPI(title="ferry node daemon", version=ferry.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.daemon = d
    problems.install(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        # Every body states its length, and it is bounded before a byte is read: a
        # chunked body has no length to check (HTTP/1.1 servers may answer 411).
        length = request.headers.get("content-length")
        if "transfer-encoding" in request.headers:
            return problems.problem_response(411, "length-required", "Length required",
                                             "send the body with a Content-Length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return problems.problem_response(413, "too-large", "Request too large",
                                             f"bodies are at most {MAX_BODY_BYTES} bytes")
        response: Response = await call_next(request)
        return response

    for module in (node, vms, streams, operations, packages, cluster_routes,
                   volume_routes):
        app.include_router(module.routes(d))
    return app
