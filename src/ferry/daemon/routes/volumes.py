"""``/v1/volumes``: disks that outlive a VM (``ferry volume``, :mod:`ferry.vm.volumes`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from ferry.daemon import models as m
from ferry.daemon.state import Daemon
from ferry.vm import volumes


def routes(d: Daemon) -> APIRouter:
    r = APIRouter(tags=["volumes"])
    root = d.host.state_root

    @r.get("/v1/volumes", response_model=list[m.Volume])
    async def list_volumes() -> list[m.Volume]:
        """This node's volumes, and whether a running VM holds each."""
        found = await asyncio.to_thread(volumes.list_volumes, root)
        return [m.Volume(**v.to_json()) for v in found]

    @r.post("/v1/volumes", status_code=201, response_model=m.Volume)
    async def create_volume(body: m.CreateVolume) -> m.Volume:
        """An empty (sparse) volume; 409 if the name is taken."""
        made = await asyncio.to_thread(volumes.create_volume, root, body.name, body.size_mib)
        return m.Volume(**made.to_json())

    @r.delete("/v1/volumes/{name}", status_code=204)
    async def delete_volume(name: str) -> Response:
        """Delete a volume; 409 while a VM holds it, 404 if there is none."""
        await asyncio.to_thread(volumes.remove_volume, root, name)
        return Response(status_code=204)

    return r
