"""Endpoint strings: where to listen or connect, in one place for the CLI and daemon.

Accepted forms::

    127.0.0.1:7000  tcp://127.0.0.1:7000  tcp://[::1]:7000   TCP (TLS if a TLS config is given)
    unix:///run/ferry/mig.sock  unix:/run/ferry/mig.sock     UNIX socket
    stdio                                                     this process's stdin/stdout
    exec:ssh host ferry serve --stdio ...                     a command's stdin/stdout
"""

from __future__ import annotations

import enum
import shlex
import ssl
from dataclasses import dataclass

from ferry.errors import ConfigError
from ferry.transport.base import Stream
from ferry.transport.listener import Listener
from ferry.transport.pipe import stdio_stream, subprocess_stream
from ferry.transport.tcp import connect_tcp, listen_tcp
from ferry.transport.unix import connect_unix, listen_unix


class Scheme(enum.Enum):
    TCP = "tcp"
    UNIX = "unix"
    STDIO = "stdio"
    EXEC = "exec"


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""
    argv: tuple[str, ...] = ()

    def __str__(self) -> str:
        match self.scheme:
            case Scheme.TCP:
                host = f"[{self.host}]" if ":" in self.host else self.host
                return f"tcp://{host}:{self.port}"
            case Scheme.UNIX:
                return f"unix://{self.path}"
            case Scheme.STDIO:
                return "stdio"
            case Scheme.EXEC:
                return "exec:" + shlex.join(self.argv)


def parse_endpoint(text: str) -> Endpoint:
    """Parse an endpoint string; raises ConfigError saying what is wrong."""
    if text == "stdio":
        return Endpoint(Scheme.STDIO)
    if text.startswith("exec:"):
        argv = tuple(shlex.split(text[5:]))
        if not argv:
            raise ConfigError("exec: endpoint needs a command")
        return Endpoint(Scheme.EXEC, argv=argv)
    if text.startswith("unix:"):
        path = text[5:].removeprefix("//")
        if not path.startswith("/"):
            raise ConfigError(f"unix endpoint needs an absolute path: {text!r}")
        return Endpoint(Scheme.UNIX, path=path)
    rest = text.removeprefix("tcp://")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
    else:
        host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"expected HOST:PORT, tcp://, unix://, stdio or exec:, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in {text!r}")
    return Endpoint(Scheme.TCP, host=host, port=port)


async def connect(
    endpoint: Endpoint,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Stream:
    """Open a stream to ``endpoint`` (TLS only applies to TCP)."""
    match endpoint.scheme:
        case Scheme.TCP:
            return await connect_tcp(
                endpoint.host,
                endpoint.port,
                ssl_context=ssl_context,
                server_hostname=server_hostname,
            )
        case Scheme.UNIX:
            return await connect_unix(endpoint.path)
        case Scheme.STDIO:
            return await stdio_stream()
        case Scheme.EXEC:
            stream, _process = await subprocess_stream(list(endpoint.argv))
            return stream


async def listen(
    endpoint: Endpoint, *, ssl_context: ssl.SSLContext | None = None
) -> Listener[tuple[str, int]] | Listener[str]:
    """Bind ``endpoint`` for accepting connections (TCP or UNIX only)."""
    match endpoint.scheme:
        case Scheme.TCP:
            return await listen_tcp(endpoint.host, endpoint.port, ssl_context=ssl_context)
        case Scheme.UNIX:
            return await listen_unix(endpoint.path)
        case _:
            raise ConfigError(f"cannot listen on {endpoint}")
