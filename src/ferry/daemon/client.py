"""A small client of the daemon's API: stdlib only, so a CLI using it imports fast.

``DaemonClient.unix(path)`` talks over the daemon's UNIX socket;
``DaemonClient.tcp(host, port, token, ssl_context=...)`` over TCP with the bearer token
and/or mutual TLS (a context from :func:`ferry.transport.tls.client_context`). Replies
are decoded JSON; an error status raises :class:`DaemonError` carrying the
problem body (:mod:`ferry.daemon.problems`).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferry.errors import FerryError

DEFAULT_TIMEOUT_S = 130.0


class DaemonError(FerryError):
    """The daemon answered with an error; ``status`` and ``problem`` say which."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{problem.get('title', 'error')} ({status}): "
                         f"{problem.get('detail', '')}")
        self.status = status
        self.problem = problem


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    def __init__(self, connect: Any, token: str | None = None) -> None:
        self._connect = connect
        self._token = token

    @classmethod
    def unix(cls, path: Path) -> DaemonClient:
        return cls(lambda timeout: _UnixConnection(path, timeout))

    @classmethod
    def tcp(cls, host: str, port: int, token: str | None, *,
            ssl_context: ssl.SSLContext | None = None) -> DaemonClient:
        if ssl_context is not None:
            return cls(lambda timeout: http.client.HTTPSConnection(
                host, port, timeout=timeout, context=ssl_context), token)
        return cls(lambda timeout: http.client.HTTPConnection(host, port, timeout=timeout),
                   token)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def raw(self, method: str, path: str, body: bytes | None = None, *,
            headers: dict[str, str] | None = None,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, bytes]:
        """One request as given; (status, body bytes)."""
        conn = self._connect(timeout_s)
        try:
            conn.request(method, path, body=body, headers={**self._headers(body),
                                                           **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None, *,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
        """JSON in, JSON out; raises :class:`DaemonError` on a 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        status, raw = self.raw(method, path, data, timeout_s=timeout_s)
        value = json.loads(raw) if raw else None
        if status >= 400:
            raise DaemonError(status, value if isinstance(value, dict) else {})
        return value

    def events(self, *, timeout_s: float | None = DEFAULT_TIMEOUT_S,
               ) -> Iterator[dict[str, Any]]:
        """Follow ``/v1/events`` (server-sent events) until the daemon ends the stream
        (``timeout_s`` None: however long it is quiet)."""
        conn = self._connect(timeout_s)
        try:
            conn.request("GET", "/v1/events", headers=self._headers(None))
            resp = conn.getresponse()
            if resp.status >= 400:
                raise DaemonError(resp.status, json.loads(resp.read() or b"{}"))
            for line in resp:
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
        finally:
            conn.close()

    def wait(self, op: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
        """The operation once finished (long-polls ``?wait_s=``)."""
        while op["state"] == "running":
            op = self.call("GET", f"/v1/operations/{op['id']}?wait_s=30", timeout_s=timeout_s)
        return op
