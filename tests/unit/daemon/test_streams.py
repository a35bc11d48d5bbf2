"""The daemon's WebSocket routes for ``exec -i/-t`` and ``attach``, over a real uvicorn on a
UNIX socket, relaying to a scripted holder's control socket."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from ferry.daemon.api import create_app
from ferry.daemon.serve import BearerAuth
from ferry.guest.agent.protocol import ExecOutcome, OutputStream
from ferry.hostconfig import HostConfig
from ferry.node import interactive as ia
from ferry.node.control import (
    AttachReply,
    AttachRequest,
    Channel,
    Reply,
    Request,
    SessionReply,
    SessionRequest,
    StreamRequest,
    serve_control,
)
from ferry.node.holder import ConsoleBusyError
from ferry.vm.registry import VMPaths

VM = "wtty"


class FakeHolder:
    """Sessions upper-case their input and exit 5 at EOF; the console echoes reversed."""

    def __init__(self) -> None:
        self.console_busy = False
        self.requests: list[StreamRequest] = []

    async def handle(self, req: Request) -> Reply:
        raise AssertionError(f"unexpected {req}")

    async def stream(self, req: StreamRequest, channel: Channel) -> None:
        self.requests.append(req)
        if isinstance(req, AttachRequest):
            if self.console_busy:
                raise ConsoleBusyError("someone is attached to the console already", vm=VM)
            await channel.accept(AttachReply())
            while (event := await channel.receive()) is not None:
                if isinstance(event, ia.Input):
                    await channel.send(ia.Output(OutputStream.STDOUT, event.data[::-1]))
            return
        await channel.accept(SessionReply(77))
        while (event := await channel.receive()) is not None:
            match event:
                case ia.Input(data=data):
                    await channel.send(ia.Output(OutputStream.STDOUT, data.upper()))
                case ia.Resize(rows=rows, cols=cols):
                    await channel.send(ia.Output(OutputStream.STDERR, f"{rows}x{cols}".encode()))
                case ia.Eof():
                    await channel.send(ia.Exit(5, ExecOutcome.EXITED))


class Site:
    def __init__(self, root: Path, holder: FakeHolder) -> None:
        self.socket = root / "d.sock"
        self.holder = holder

    def connect(self, path: str) -> connect:
        return unix_connect(str(self.socket), uri=f"ws://localhost{path}")


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="ftty-"))  # short: UNIX socket paths
    try:
        host = HostConfig.from_environ({"FERRY_RUN_DIR": str(root / "run"),
                                        "FERRY_STATE_DIR": str(root / "state"),
                                        "FERRY_CACHE_DIR": str(root / "cache")})
        paths = VMPaths.of(host)
        paths.run_dir(VM).mkdir(parents=True)
        holder = FakeHolder()
        s = Site(root, holder)
        server = uvicorn.Server(uvicorn.Config(create_app(host, warm_holders=0),
                                               uds=str(s.socket), lifespan="off",
                                               log_level="warning"))
        async with serve_control(paths.control_socket(VM), holder.handle, holder.stream):
            task = asyncio.create_task(server.serve())
            while not server.started:
                assert not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
            try:
                yield s
            finally:
                server.should_exit = True
                await task
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _event(ws: ClientConnection) -> ia.Event:
    data = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(data, bytes)
    return ia.decode_frame(data)


async def test_a_session_relays_frames_both_ways(site: Site) -> None:
    async with site.connect(f"/v1/vms/{VM}/session") as ws:
        await ws.send(json.dumps({"argv": ["sh"], "tty": True, "rows": 24, "cols": 80,
                                  "term": "xterm"}))
        assert json.loads(await ws.recv()) == {"pid": 77}
        await ws.send(ia.encode(ia.Input(b"hello")))
        assert await _event(ws) == ia.Output(OutputStream.STDOUT, b"HELLO")
        await ws.send(ia.encode(ia.Resize(40, 120)))
        assert await _event(ws) == ia.Output(OutputStream.STDERR, b"40x120")
        await ws.send(ia.encode(ia.Eof()))
        assert await _event(ws) == ia.Exit(5, ExecOutcome.EXITED)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1000
    assert site.holder.requests == [SessionRequest(argv=("sh",), tty=True, rows=24, cols=80,
                                                   term="xterm")]


@pytest.mark.parametrize("first", [
    '{"argv": []}',
    '{"argv": ["sh"], "rows": 70000}',
    '{"argv": ["sh"], "shell": "x"}',       # unknown field
    'not json',
])
async def test_a_bad_first_message_closes_with_4400(site: Site, first: str) -> None:
    async with site.connect(f"/v1/vms/{VM}/session") as ws:
        await ws.send(first)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4400
    assert site.holder.requests == []


@pytest.mark.parametrize("frame", [
    ia.encode(ia.Output(OutputStream.STDOUT, b"a holder's frame")),
    ia.encode(ia.Input(b"abc"))[:-1],               # cut short
    ia.encode(ia.Input(b"abc")) + b"x",             # trailing bytes
    b"\x63\0\0\0\0",                                 # unknown type
])
async def test_a_bad_client_frame_closes_with_4400(site: Site, frame: bytes) -> None:
    async with site.connect(f"/v1/vms/{VM}/session") as ws:
        await ws.send(json.dumps({"argv": ["cat"]}))
        assert json.loads(await ws.recv()) == {"pid": 77}
        await ws.send(frame)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4400


async def test_attach_relays_and_a_busy_console_closes_with_4409(site: Site) -> None:
    async with site.connect(f"/v1/vms/{VM}/attach") as ws:
        assert json.loads(await ws.recv()) == {"attached": True}
        await ws.send(ia.encode(ia.Input(b"abc")))
        assert await _event(ws) == ia.Output(OutputStream.STDOUT, b"cba")
    site.holder.console_busy = True
    async with site.connect(f"/v1/vms/{VM}/attach") as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, "attached to the console already" in info.value.rcvd.reason) \
        == (4409, True)


@pytest.mark.parametrize(("vm", "code"), [("nothere", 4404), ("Bad.Name", 4400)])
async def test_no_such_vm_closes_with_4404(site: Site, vm: str, code: int) -> None:
    async with site.connect(f"/v1/vms/{vm}/attach") as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == code


async def test_the_token_guards_websockets_too() -> None:
    sent: list[dict[str, object]] = []

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("reached the application without the token")

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    guard = BearerAuth(app, token="secret")
    scope = {"type": "websocket", "path": f"/v1/vms/{VM}/attach", "headers": []}
    await guard(scope, receive, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008}]
