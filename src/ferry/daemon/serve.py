"""Where the daemon listens, who may talk to it, and uvicorn serving it.

* **The UNIX socket** (default ``<run root>/ferryd.sock``) is made owner-only
  (mode 0600, created under umask 077): whoever can open it controls this
  node's VMs, exactly like the per-VM control sockets. Requests on it need no
  credential.
* **TCP** only when asked (``ferry daemon --listen-tcp ADDR:PORT``), and then
  every request must carry ``Authorization: Bearer <token>``: the token is read
  from ``--token-file`` (created, mode 0600, with a fresh token if missing).
  A request without it, or with another, is refused with 401 before any route
  runs (:class:`BearerAuth`); the one exception is ``GET /ui``, the dashboard's
  static page, which holds no data (its script sends the token with every call).
  Which socket a request came in on is taken from the listening socket's address
  (ASGI ``server``), never from the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from ferry.errors import ConfigError
from ferry.transport import auth

log = logging.getLogger(__name__)

SOCKET_NAME = "ferryd.sock"
PUBLIC_PAGE = "/ui"
"""The one route TCP serves without the token: the dashboard's static page."""


class BearerAuth:
    """ASGI middleware: requests not on the UNIX socket need the bearer token."""

    def __init__(self, app: ASGIApp, *, unix_path: Path, token: str | None) -> None:
        self.app = app
        self._unix = (str(unix_path), None)
        self._expected = None if token is None else f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and tuple(scope.get("server") or ()) \
                != self._unix and not self._public(scope) and not self._authorized(scope):
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
        if self._expected is None:
            return False
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
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def load_token(path: Path) -> str:
    """The TCP token in ``path``; a fresh one is written there (0600) if it is missing."""
    if not path.exists():
        auth.write_token_file(path, auth.new_token())
    return auth.read_token_file(path)


async def serve(app: ASGIApp, *, unix_path: Path, tcp: tuple[str, int] | None = None,
                token_file: Path | None = None,
                on_listening: Callable[[dict[str, Any]], None] = lambda info: None) -> None:
    """Serve ``app`` until cancelled (the CLI cancels on SIGINT/SIGTERM); then shut down
    gracefully: requests in flight finish, operations still running are cancelled."""
    if tcp is not None and token_file is None:
        raise ConfigError("the daemon serves TCP only with a bearer token (--token-file)")
    token = load_token(token_file) if token_file is not None else None
    sockets = [unix_listener(unix_path)]
    try:
        info: dict[str, Any] = {"socket": str(unix_path)}
        if tcp is not None:
            sockets.append(tcp_listener(*tcp))
            info["tcp"] = list(sockets[-1].getsockname()[:2])
        config = uvicorn.Config(BearerAuth(app, unix_path=unix_path, token=token),
                                log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=10)
        server = _Server(config)
        on_listening(info)
        task = asyncio.create_task(server.serve(sockets=sockets), name="uvicorn")
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Stop accepting, let requests in flight finish, run the lifespan's shutdown
            # (it cancels running operations: a migration is cancelled, not abandoned).
            server.should_exit = True
            await task
            raise
    finally:
        for s in sockets:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix_path)
