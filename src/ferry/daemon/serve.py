"""Where the daemon listens, who may talk to it, and uvicorn serving it.

* **The UNIX socket** (default ``<run root>/ferryd.sock``) is made owner-only
  (mode 0600, created under umask 077): whoever can open it controls this
  node's VMs, exactly like the per-VM control sockets. Requests on it need no
  credential.
* **TCP** only when asked (``ferry daemon --listen-tcp ADDR:PORT``), and then with
  one or both of:

  - **mutual TLS** (``--tls-cert/--tls-key/--tls-ca``, ferry's certificates from
    ``ferry certs``): TLS 1.3, and a client without a certificate signed by the CA
    fails the handshake, before any HTTP;
  - **a bearer token** (``--token-file``, created mode 0600 with a fresh token if
    missing): every request must carry ``Authorization: Bearer <token>``, else 401
    before any route runs (:class:`BearerAuth`); the one exception is ``GET /ui``,
    the dashboard's static page, which holds no data (its script sends the token with
    every call).

  TCP is served by its own uvicorn server over the same application, so the UNIX
  socket never speaks TLS and never asks for a token; the TCP server starts once the
  application's lifespan has, and stops first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from ferry.errors import ConfigError
from ferry.transport import auth, tls

log = logging.getLogger(__name__)

SOCKET_NAME = "ferryd.sock"
PUBLIC_PAGE = "/ui"
"""The one route TCP serves without the token: the dashboard's static page."""


class BearerAuth:
    """ASGI middleware: every request needs the bearer token (but ``GET /ui``)."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self._public(scope) \
                and not self._authorized(scope):
            if scope["type"] == "websocket":  # closed before the accept: HTTP 403
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps({"type": "https://ferry.dev/problems/unauthorized",
                               "title": "Unauthorized", "status": 401,
                               "detail": "this endpoint needs 'Authorization: Bearer <token>'"
                               }).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/problem+json"),
                                    (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _public(scope: Scope) -> bool:
        """The dashboard's page itself: static, no data (its requests carry the token)."""
        return scope["type"] == "http" and scope.get("method") == "GET" \
            and scope.get("path") == PUBLIC_PAGE

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the CLI's (SIGINT/SIGTERM cancel the
    command) stay in charge, and :func:`serve` turns that cancellation into uvicorn's
    graceful shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def unix_listener(path: Path) -> socket.socket:
    """A listening UNIX socket at ``path``, mode 0600; a stale socket file is replaced,
    a live one (another daemon) is a :class:`ConfigError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            path.unlink()  # nobody listens: a daemon that died
        else:
            raise ConfigError(f"another daemon listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by every accepted connection: uvicorn serving a socket made beforehand
    # does not set it, and each answer's body then waited behind its headers for the
    # client's delayed ACK (44 ms a request here, 0.4 ms with it).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def load_token(path: Path) -> str:
    """The TCP token in ``path``; a fresh one is written there (0600) if it is missing."""
    if not path.exists():
        auth.write_token_file(path, auth.new_token())
    return auth.read_token_file(path)


@dataclass(frozen=True, slots=True)
class TCPAccess:
    """How TCP clients authenticate: mutual TLS, a bearer token, or both."""

    token_file: Path | None = None
    tls: tuple[Path, Path, Path] | None = None
    """Server certificate, its key, and the CA client certificates must chain to."""

    def __post_init__(self) -> None:
        if self.token_file is None and self.tls is None:
            raise ConfigError("the daemon serves TCP only with mutual TLS (--tls-cert, "
                              "--tls-key, --tls-ca) or a bearer token (--token-file)")


def _config(app: ASGIApp, *, lifespan: Literal["on", "off"],
            ssl_context: ssl.SSLContext | None = None) -> uvicorn.Config:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan,
                            timeout_graceful_shutdown=10)
    config.load()
    config.ssl = ssl_context  # ferry's own context (TLS 1.3, client certificate required)
    return config


async def serve(app: ASGIApp, *, unix_path: Path, tcp: tuple[str, int] | None = None,
                access: TCPAccess | None = None,
                on_listening: Callable[[dict[str, Any]], None] = lambda info: None) -> None:
    """Serve ``app`` until cancelled (the CLI cancels on SIGINT/SIGTERM); then shut down
    gracefully: requests in flight finish, operations still running are cancelled."""
    if tcp is not None and access is None:
        access = TCPAccess()  # raises: TCP needs mutual TLS or a token
    tcp_app: ASGIApp = app
    ssl_context = None
    if tcp is not None and access is not None:
        if access.token_file is not None:
            tcp_app = BearerAuth(app, token=load_token(access.token_file))
        if access.tls is not None:
            ssl_context = tls.server_context(*access.tls)
    sockets = [unix_listener(unix_path)]
    try:
        info: dict[str, Any] = {"socket": str(unix_path)}
        main = _Server(_config(app, lifespan="on"))
        servers = [main]
        main_task = asyncio.create_task(main.serve(sockets=sockets[:1]), name="uvicorn")
        tasks = [main_task]
        try:
            # The TCP server shares the application, not its lifespan: it starts once
            # the lifespan (the daemon's task group) runs.
            while not main.started:
                if main_task.done():
                    await main_task
                    raise ConfigError("the daemon's server stopped while starting")
                await asyncio.sleep(0.01)
            if tcp is not None:
                sockets.append(tcp_listener(*tcp))
                info["tcp"] = list(sockets[-1].getsockname()[:2])
                info["tcp_auth"] = [a for a, on in (("mtls", ssl_context is not None),
                                                    ("token", tcp_app is not app)) if on]
                servers.insert(0, _Server(_config(tcp_app, lifespan="off",
                                                  ssl_context=ssl_context)))
                tasks.insert(0, asyncio.create_task(servers[0].serve(sockets=sockets[1:]),
                                                    name="uvicorn tcp"))
            on_listening(info)
            await asyncio.shield(asyncio.gather(*tasks))
        except asyncio.CancelledError:
            # Stop accepting (TCP first), let requests in flight finish, then run the
            # lifespan's shutdown (it cancels running operations: a migration is
            # cancelled, not abandoned).
            for server, task in zip(servers, tasks, strict=True):
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await task
            raise
    finally:
        for s in sockets:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix_path)
