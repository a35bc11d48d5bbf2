"""``/v1/vms/{id}/session`` and ``/v1/vms/{id}/attach``: WebSockets for ``exec -i/-t`` and
the serial console.

Each relays between a WebSocket and the VM holder's interactive stream
(:meth:`ControlClient.stream <ferry.node.control.ControlClient.stream>`): one binary
WebSocket message is one frame of :mod:`ferry.node.interactive`, both ways, checked
on the way in (the client may send INPUT, EOF, RESIZE and SIGNAL only).

``session``: the client's first message is text, the JSON of :class:`SessionVM`
(``{"argv": ["sh"], "tty": true, "rows": 24, "cols": 80, "term": "xterm"}``); the
daemon answers ``{"pid": N}`` as text once the command runs, then frames; the last
one is EXIT (or ERROR). ``attach``: the daemon answers ``{"attached": true}`` as text,
then the console's bytes as OUTPUT frames; the client detaches by closing.
A refusal closes the WebSocket before any frame with a code and the reason:
4400 a bad first message or frame, 4404 no such VM runs here, 4409 the console
has an attacher already, 4500 anything else the holder said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ferry.aio import cancel_and_wait
from ferry.daemon.state import Daemon
from ferry.errors import ConfigError
from ferry.node import interactive
from ferry.node.control import (
    AttachRequest,
    Channel,
    ControlProtocolError,
    RemoteOpError,
    SessionReply,
    SessionRequest,
    StreamRequest,
)
from ferry.vm.errors import ControlError, VMNotFoundError

log = logging.getLogger(__name__)

MAX_ARGV = 256
CLOSE_BAD_REQUEST = 4400
CLOSE_NOT_FOUND = 4404
CLOSE_BUSY = 4409
CLOSE_FAILED = 4500
FIRST_MESSAGE_S = 30.0


class SessionVM(BaseModel):
    """The first message of ``/v1/vms/{id}/session``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    argv: Annotated[list[str], Field(min_length=1, max_length=MAX_ARGV)]
    tty: bool = False
    rows: Annotated[int, Field(ge=0, le=0xFFFF)] = 0
    cols: Annotated[int, Field(ge=0, le=0xFFFF)] = 0
    term: Annotated[str, Field(max_length=64)] = ""


def routes(d: Daemon) -> APIRouter:
    r = APIRouter(tags=["vms"])

    @r.websocket("/v1/vms/{vm_id}/session")
    async def session(ws: WebSocket, vm_id: str) -> None:
        await ws.accept()
        try:
            async with asyncio.timeout(FIRST_MESSAGE_S):
                body = SessionVM.model_validate_json(await ws.receive_text())
            req = SessionRequest.of(body.argv, tty=body.tty, rows=body.rows, cols=body.cols,
                                    term=body.term)
        except (ValidationError, ControlProtocolError, TimeoutError, KeyError) as exc:
            await ws.close(CLOSE_BAD_REQUEST, _reason(f"bad session request: {exc}"))
            return
        except WebSocketDisconnect:
            return
        await _relay(d, ws, vm_id, req)

    @r.websocket("/v1/vms/{vm_id}/attach")
    async def attach(ws: WebSocket, vm_id: str) -> None:
        await ws.accept()
        await _relay(d, ws, vm_id, AttachRequest())

    return r


async def _relay(d: Daemon, ws: WebSocket, vm_id: str, req: StreamRequest) -> None:
    try:
        client = d.client(vm_id)
        async with client.stream(req) as (reply, channel):
            await ws.send_json({"pid": reply.pid} if isinstance(reply, SessionReply)
                               else {"attached": True})
            await _pump(ws, channel)
    except VMNotFoundError as exc:
        await _close(ws, CLOSE_NOT_FOUND, str(exc))
    except RemoteOpError as exc:
        await _close(ws, CLOSE_BUSY if exc.kind == "ConsoleBusyError" else CLOSE_FAILED,
                     str(exc))
    except (interactive.StreamProtocolError, ConfigError) as exc:  # a bad frame or VM id
        await _close(ws, CLOSE_BAD_REQUEST, str(exc))
    except ControlError as exc:
        await _close(ws, CLOSE_FAILED, str(exc))


async def _pump(ws: WebSocket, channel: Channel) -> None:
    """Frames both ways until the client or the holder ends the stream."""

    async def to_holder() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                raise interactive.StreamProtocolError("frames are binary messages")
            event = interactive.decode_frame(data)
            if not isinstance(event, interactive.ClientEvent):
                raise interactive.StreamProtocolError(
                    f"a client may not send {type(event).__name__}")
            await channel.send(event)

    async def to_client() -> None:
        while (event := await channel.receive()) is not None:
            await ws.send_bytes(interactive.encode(event))
            if isinstance(event, interactive.Exit | interactive.Error):
                break
        await _close(ws, 1000, "")

    tasks = [asyncio.ensure_future(to_holder()), asyncio.ensure_future(to_client())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            await cancel_and_wait(task, swallow_errors=True)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # already closed
        await ws.close(code, _reason(reason))


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    return text.encode()[:120].decode(errors="ignore")
