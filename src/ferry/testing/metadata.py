"""Faithful local emulators of the three providers' metadata services, for tests and demos.

:class:`MetadataEmulator` is one ASGI application (Starlette, served by uvicorn) that
answers as AWS IMDSv2, GCP's metadata server and Azure IMDS answer, on the paths and
with the rules the watchers of :mod:`ferry.spot` meet in a cloud:

* **AWS**: ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds``
  (1..21600, else 400) and is refused (403) with ``X-Forwarded-For``; every
  ``/latest/meta-data/`` GET needs a live token (else 401, as with IMDSv2 required).
  ``spot/instance-action`` is 404 until a notice, then ``{"action", "time"}``.
* **GCP**: ``/computeMetadata/v1/`` needs ``Metadata-Flavor: Google`` (else 403) and
  answers with it. ``instance/preempted`` is ``FALSE``/``TRUE`` with an ETag of its
  value; ``wait_for_change=true`` hangs until the value's ETag differs from
  ``last_etag`` (or from the current one) or ``timeout_sec`` passes.
* **Azure**: ``/metadata/`` needs ``Metadata: true`` and ``api-version`` (else 400,
  with Azure's error bodies) and refuses ``X-Forwarded-For``. ``scheduledevents``
  is ``{"DocumentIncarnation", "Events"}``; the incarnation grows with every change;
  a ``StartRequests`` POST starts the named events (``EventStatus: Started``,
  ``NotBefore: ""``). ``instance/compute/name`` is the VM's name.

A test injects at any moment, in-process (:meth:`MetadataEmulator.inject`), or through
the control application (:func:`control_app`, on a UNIX socket, for a shell or another
process). :meth:`MetadataEmulator.serve_raw` replaces a provider's notice answer with any
status, headers and body (hostile ones). Only the providers the emulator is made with
answer; the others' paths are 404, as on another cloud.

:func:`metadata_namespace` makes a namespace with ``169.254.169.254/32`` on its loopback,
and :func:`link_local_socket` a listening socket there at port 80, so a watcher inside the
namespace runs exactly as in a cloud. ``python -m ferry.testing.metadata`` serves it from
a shell (run it inside a namespace with ``ip netns exec``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ferry.errors import ConfigError
from ferry.net import links, netns
from ferry.net.state import DEFAULT_RUN_DIR, OwnerRecord, RunDir, remove_resources
from ferry.spot.notice import Provider

log = logging.getLogger(__name__)

LINK_LOCAL = "169.254.169.254"
AWS_MAX_TTL_S = 21600
GCP_MAX_HANG_S = 60.0
"""A hanging GET never waits longer than this here (the tests' servers must stop)."""
VM_NAME = "ferry-spot-vm"


@dataclass(slots=True)
class RawAnswer:
    """An answer served instead of a provider's real one (``times`` left; None: forever)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None


def _http_date(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


class MetadataEmulator:
    """The metadata service of the given providers, with notices injected on demand."""

    def __init__(self, providers: Iterable[Provider | str] = tuple(Provider), *,
                 vm_name: str = VM_NAME) -> None:
        self.providers = {Provider(p) for p in providers}
        self.vm_name = vm_name
        self.requests: Counter[str] = Counter()
        """``"METHOD path"`` -> how often it was asked (query left out)."""
        self.acknowledged: list[str] = []
        """Azure EventIds acknowledged with StartRequests, in order."""
        self._tokens: dict[str, float] = {}  # AWS token -> monotonic expiry
        self._aws_action: dict[str, str] | None = None
        self._gcp_preempted = False
        self._azure_events: list[dict[str, Any]] = []
        self._azure_incarnation = 1
        self._raw: dict[Provider, RawAnswer] = {}
        self._changed = asyncio.Event()  # set and replaced at every change (GCP's waiters)
        self._closing = False
        self.app = Starlette(routes=[
            Route("/latest/api/token", self._aws_token, methods=["PUT"]),
            Route("/latest/meta-data/{item:path}", self._aws_meta, methods=["GET"]),
            Route("/computeMetadata/v1/{item:path}", self._gcp, methods=["GET"]),
            Route("/metadata/scheduledevents", self._azure_events_route,
                  methods=["GET", "POST"]),
            Route("/metadata/instance/compute/name", self._azure_name, methods=["GET"]),
        ])

    # -- what a test does ---------------------------------------------------------------

    def inject(self, provider: Provider | str, *, action: str | None = None,
               in_s: float | None = None, resources: list[str] | None = None) -> str:
        """Announce a notice now: AWS ``action`` (terminate) at ``in_s`` (120) from now;
        GCP ``preempted`` TRUE; Azure an event of type ``action`` (Preempt) on
        ``resources`` (this VM) with NotBefore ``in_s`` (30) from now. Returns the
        event's key (AWS time, ``preempted``, Azure EventId)."""
        provider = Provider(provider)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        match provider:
            case Provider.AWS:
                when = now + dt.timedelta(seconds=120 if in_s is None else in_s)
                self._aws_action = {"action": action or "terminate",
                                    "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
                key = self._aws_action["time"]
            case Provider.GCP:
                self._gcp_preempted = True
                key = "preempted"
            case Provider.AZURE:
                key = str(uuid.uuid4())
                when = now + dt.timedelta(seconds=30 if in_s is None else in_s)
                self._azure_events.append({
                    "EventId": key, "EventType": action or "Preempt",
                    "ResourceType": "VirtualMachine",
                    "Resources": [self.vm_name] if resources is None else resources,
                    "EventStatus": "Scheduled", "NotBefore": _http_date(when),
                    "Description": "Virtual machine is being preempted.",
                    "EventSource": "Platform", "DurationInSeconds": -1})
                self._azure_incarnation += 1
        log.info("emulator: %s notice injected (%s)", provider, key)
        self._wake()
        return key

    def clear(self, provider: Provider | str) -> None:
        """Withdraw every notice of ``provider`` (a fresh machine)."""
        match Provider(provider):
            case Provider.AWS:
                self._aws_action = None
            case Provider.GCP:
                self._gcp_preempted = False
            case Provider.AZURE:
                self._azure_events.clear()
                self._azure_incarnation += 1
        self._wake()

    def serve_raw(self, provider: Provider | str, status: int, body: bytes | str, *,
                  headers: Mapping[str, str] | None = None, times: int | None = None) -> None:
        """Answer ``provider``'s notice path (instance-action, preempted, scheduledevents
        GET) with exactly this, ``times`` times (None: until :meth:`clear_raw`)."""
        self._raw[Provider(provider)] = RawAnswer(
            status, body.encode() if isinstance(body, str) else body, dict(headers or {}), times)
        self._wake()

    def clear_raw(self, provider: Provider | str) -> None:
        self._raw.pop(Provider(provider), None)
        self._wake()

    def revoke_tokens(self) -> None:
        """Every AWS session token stops working (the next GET is a 401)."""
        self._tokens.clear()

    def asked(self, path: str, method: str = "GET") -> int:
        return self.requests[f"{method} {path}"]

    def state(self) -> dict[str, Any]:
        return {"providers": sorted(self.providers), "aws": self._aws_action,
                "gcp": {"preempted": self._gcp_preempted},
                "azure": {"DocumentIncarnation": self._azure_incarnation,
                          "Events": self._azure_events},
                "acknowledged": self.acknowledged, "raw": sorted(self._raw),
                "requests": dict(self.requests)}

    def close(self) -> None:
        """Release hanging GETs (so the server can stop at once)."""
        self._closing = True
        self._wake()

    # -- the services ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _count(self, request: Request) -> None:
        self.requests[f"{request.method} {request.url.path}"] += 1

    def _take_raw(self, provider: Provider) -> Response | None:
        raw = self._raw.get(provider)
        if raw is None:
            return None
        if raw.times is not None:
            raw.times -= 1
            if raw.times <= 0:
                del self._raw[provider]
        return Response(raw.body, raw.status, headers=raw.headers)

    async def _aws_token(self, request: Request) -> Response:
        self._count(request)
        if Provider.AWS not in self.providers:
            return PlainTextResponse("Not Found", 404)
        if "x-forwarded-for" in request.headers:
            return PlainTextResponse("Forbidden", 403)
        ttl = request.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= AWS_MAX_TTL_S:
            return PlainTextResponse("Bad Request", 400)
        token = secrets.token_urlsafe(42)
        self._tokens[token] = time.monotonic() + int(ttl)
        return PlainTextResponse(token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    async def _aws_meta(self, request: Request) -> Response:
        self._count(request)
        if Provider.AWS not in self.providers:
            return PlainTextResponse("Not Found", 404)
        expiry = self._tokens.get(request.headers.get("x-aws-ec2-metadata-token", ""))
        if expiry is None or expiry < time.monotonic():
            return PlainTextResponse("Unauthorized", 401)
        item = request.path_params["item"]
        if item == "spot/instance-action":
            raw = self._take_raw(Provider.AWS)
            if raw is not None:
                return raw
            if self._aws_action is None:
                return PlainTextResponse("Not Found", 404)
            return PlainTextResponse(json.dumps(self._aws_action))
        if item == "instance-id":
            return PlainTextResponse("i-0f3e27a1c5b9d4e6a")
        return PlainTextResponse("Not Found", 404)

    async def _gcp(self, request: Request) -> Response:
        self._count(request)
        flavor = {"Metadata-Flavor": "Google"}
        if Provider.GCP not in self.providers:
            return PlainTextResponse("Not Found", 404)
        if request.headers.get("metadata-flavor") != "Google" \
                or "x-forwarded-for" in request.headers:
            return PlainTextResponse("Missing required header: Metadata-Flavor", 403,
                                     headers=flavor)
        item = request.path_params["item"]
        if item == "instance/name":
            return PlainTextResponse(self.vm_name, headers=flavor)
        if item != "instance/preempted":
            return PlainTextResponse("Not Found", 404, headers=flavor)
        q = request.query_params
        if q.get("wait_for_change") == "true":
            try:
                hang_s = min(GCP_MAX_HANG_S, float(q.get("timeout_sec", GCP_MAX_HANG_S)))
            except ValueError:
                return PlainTextResponse("Bad Request", 400, headers=flavor)
            last = q.get("last_etag") or self._gcp_etag()
            deadline = time.monotonic() + hang_s
            while self._gcp_etag() == last and Provider.GCP not in self._raw \
                    and not self._closing and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        raw = self._take_raw(Provider.GCP)
        if raw is not None:
            return raw
        return PlainTextResponse(self._gcp_value(), media_type="application/text",
                                 headers={**flavor, "ETag": self._gcp_etag()})

    def _gcp_value(self) -> str:
        return "TRUE" if self._gcp_preempted else "FALSE"

    def _gcp_etag(self) -> str:
        return hashlib.sha256(self._gcp_value().encode()).hexdigest()[:16]

    def _azure_refusal(self, request: Request) -> Response | None:
        if Provider.AZURE not in self.providers:
            return PlainTextResponse("Not Found", 404)
        if "x-forwarded-for" in request.headers:
            return JSONResponse({"error": "Bad request. Request is forwarded."}, 400)
        if request.headers.get("metadata") != "true":
            return JSONResponse({"error": "Bad request. Required metadata header not "
                                          "specified"}, 400)
        if "api-version" not in request.query_params:
            return JSONResponse({"error": "Bad request. api-version was not specified in "
                                          "the request.", "newest-versions": ["2021-02-01"]},
                                400)
        return None

    async def _azure_events_route(self, request: Request) -> Response:
        self._count(request)
        refused = self._azure_refusal(request)
        if refused is not None:
            return refused
        if request.method == "POST":
            return await self._azure_start(request)
        raw = self._take_raw(Provider.AZURE)
        if raw is not None:
            return raw
        return JSONResponse({"DocumentIncarnation": self._azure_incarnation,
                             "Events": self._azure_events})

    async def _azure_start(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            ids = [str(s["EventId"]) for s in body["StartRequests"]]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "Bad request. Invalid StartRequests."}, 400)
        known = {e["EventId"]: e for e in self._azure_events}
        if any(i not in known for i in ids):
            return JSONResponse({"error": "Bad request. Unknown EventId."}, 400)
        for i in ids:
            known[i]["EventStatus"] = "Started"
            known[i]["NotBefore"] = ""
            self.acknowledged.append(i)
        self._azure_incarnation += 1
        self._wake()
        return Response(status_code=200)

    async def _azure_name(self, request: Request) -> Response:
        self._count(request)
        refused = self._azure_refusal(request)
        if refused is not None:
            return refused
        if request.query_params.get("format") == "text":
            return PlainTextResponse(self.vm_name)
        return JSONResponse(self.vm_name)

    # -- serving --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self, sock: socket.socket) -> AsyncIterator[None]:
        """Serve on the listening ``sock`` until the block ends."""
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Accepted sockets inherit it: without it the body waits behind the headers
            # for the client's delayed ACK (40 ms here), where a real service answers in
            # well under a millisecond.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with _serving(self.app, sock):
            try:
                yield
            finally:
                self.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@contextlib.asynccontextmanager
async def _serving(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="metadata emulator")
    try:
        while not server.started:
            if task.done():
                await task
                raise ConfigError("the metadata emulator stopped while starting")
            await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        await task


def control_app(emulator: MetadataEmulator) -> Starlette:
    """Injection over HTTP: ``POST /inject/{provider}`` (JSON: ``action``, ``in_s``,
    ``resources``), ``POST /raw/{provider}`` (``status``, ``body``, ``headers``,
    ``times``), ``DELETE /raw/{provider}``, ``DELETE /notices/{provider}``, ``GET /state``."""

    async def inject(request: Request) -> Response:
        args = await request.json() if await request.body() else {}
        key = emulator.inject(request.path_params["provider"], action=args.get("action"),
                              in_s=args.get("in_s"), resources=args.get("resources"))
        return JSONResponse({"key": key})

    async def raw(request: Request) -> Response:
        provider = request.path_params["provider"]
        if request.method == "DELETE":
            emulator.clear_raw(provider)
        else:
            args = await request.json()
            emulator.serve_raw(provider, int(args["status"]), str(args["body"]),
                               headers=args.get("headers"), times=args.get("times"))
        return JSONResponse({"ok": True})

    async def clear(request: Request) -> Response:
        emulator.clear(request.path_params["provider"])
        return JSONResponse({"ok": True})

    async def refused(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, 400)

    async def state(request: Request) -> Response:
        return JSONResponse(emulator.state())

    return Starlette(exception_handlers={ValueError: refused, KeyError: refused}, routes=[
        Route("/inject/{provider}", inject, methods=["POST"]),
        Route("/raw/{provider}", raw, methods=["POST", "DELETE"]),
        Route("/notices/{provider}", clear, methods=["DELETE"]),
        Route("/state", state, methods=["GET"]),
    ])


# -- a namespace with the link-local address ---------------------------------------------


async def add_link_local(namespace: str | None) -> None:
    """Put ``169.254.169.254/32`` on ``namespace``'s loopback (as a cloud's host route does)
    unless it is there already (``None``: this namespace)."""
    if f"{LINK_LOCAL}/32" not in await links.ipv4_addresses(namespace):
        await links.add_address(namespace, "lo", f"{LINK_LOCAL}/32")


async def link_local_socket(namespace: str | None, port: int = 80, *,
                            address: str = LINK_LOCAL) -> socket.socket:
    """A listening TCP socket at ``address:port`` (169.254.169.254:80) inside ``namespace``."""
    sock = await netns.socket_in_netns(namespace)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}:{port} in {namespace}: {exc}") from exc
    return sock


@contextlib.asynccontextmanager
async def metadata_namespace(tag: str, *, link_local: bool = True,
                             run_dir: Path | str = DEFAULT_RUN_DIR) -> AsyncIterator[str]:
    """A namespace ``ferry-spot-<tag>`` with 169.254.169.254 on its loopback (unless not
    ``link_local``), removed on exit (and recorded, so a crashed run's is removed by
    ``ferry doctor --clean``)."""
    name = netns.check_name(f"{netns.PREFIX}spot-{tag}")
    rd = RunDir(run_dir)
    record = OwnerRecord.for_current_process(f"spot-{tag}", "spot-metadata",
                                             namespaces=(name,))
    async with rd.locked():
        rd.write(record)
    try:
        await netns.create(name)
        if link_local:
            await add_link_local(name)
        yield name
    finally:
        await remove_resources(record)
        rd.remove(record.key)


@contextlib.asynccontextmanager
async def emulator_in(namespace: str, providers: Iterable[Provider | str] = tuple(Provider),
                      *, vm_name: str = VM_NAME, add_address: bool = False
                      ) -> AsyncIterator[MetadataEmulator]:
    """An emulator answering at 169.254.169.254:80 inside ``namespace`` (this process
    serves it: the socket lives in the namespace, the loop here). ``add_address`` puts the
    address on the namespace's loopback first (a test host of :mod:`ferry.testing.hosts`
    has none; it goes with the namespace)."""
    if add_address:
        await add_link_local(namespace)
    emulator = MetadataEmulator(providers, vm_name=vm_name)
    sock = await link_local_socket(namespace)
    try:
        async with emulator.serving(sock):
            yield emulator
    finally:
        sock.close()


async def _main(args: argparse.Namespace) -> None:
    emulator = MetadataEmulator(args.providers.split(","), vm_name=args.vm_name)
    if args.add_address:
        await add_link_local(None)
    sock = await link_local_socket(None, args.port, address=args.address)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.control)
    control.bind(args.control)
    control.listen(16)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with emulator.serving(sock), _serving(control_app(emulator), control):
            print(json.dumps({"ready": True, "address": f"{args.address}:{args.port}",
                              "control": args.control}), flush=True)
            await stop.wait()
    finally:
        sock.close()
        control.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.control)


def main(argv: list[str] | None = None) -> None:
    """``ip netns exec NS python -m ferry.testing.metadata --control SOCK``: serve here
    (``ferry lab exec HOST -- python -m ferry.testing.metadata --add-address ...`` on a lab
    host)."""
    p = argparse.ArgumentParser(description="emulate the providers' metadata services")
    p.add_argument("--providers", default="aws,gcp,azure")
    p.add_argument("--vm-name", default=VM_NAME)
    p.add_argument("--address", default=LINK_LOCAL,
                   help="where to answer (default 169.254.169.254; 127.0.0.1 needs no root)")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--add-address", action="store_true",
                   help="first put 169.254.169.254/32 on this namespace's loopback (root)")
    p.add_argument("--control", required=True, help="UNIX socket of the control API")
    args = p.parse_args(argv)
    asyncio.run(_main(args))  # until SIGTERM or SIGINT


if __name__ == "__main__":
    main()
