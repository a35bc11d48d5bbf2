"""Byte-stream transports: TCP, UNIX sockets, mutual TLS, pipes/ssh, memory.

Every transport yields a :class:`Stream` (see :mod:`ferry.transport.base`);
the migration protocol runs unchanged over any of them.
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
    from ferry.transport.base import Stream
    from ferry.transport.certs import CAFiles, HostCertFiles, create_ca, create_host_cert
    from ferry.transport.listener import Handler, Listener
    from ferry.transport.memory import MemoryStream, memory_stream_pair
    from ferry.transport.pipe import fd_stream, stdio_stream, subprocess_stream
    from ferry.transport.sockets import ReceiveIntoStream, SocketStream
    from ferry.transport.streams import (
        AsyncioStream,
        ConnectTimeoutError,
        HalfCloseUnsupportedError,
    )
    from ferry.transport.tcp import connect_tcp, listen_tcp, serve_tcp
    from ferry.transport.tls import (
        TLSStream,
        client_context,
        client_context_for,
        server_context,
        server_context_for,
    )
    from ferry.transport.unix import connect_unix, listen_unix, serve_unix

__all__ = [
    "AsyncioStream",
    "CAFiles",
    "ConnectTimeoutError",
    "HalfCloseUnsupportedError",
    "Handler",
    "HostCertFiles",
    "Listener",
    "MemoryStream",
    "ReceiveIntoStream",
    "SocketStream",
    "Stream",
    "TLSStream",
    "client_context",
    "client_context_for",
    "connect_tcp",
    "connect_unix",
    "create_ca",
    "create_host_cert",
    "fd_stream",
    "listen_tcp",
    "listen_unix",
    "memory_stream_pair",
    "serve_tcp",
    "serve_unix",
    "server_context",
    "server_context_for",
    "stdio_stream",
    "subprocess_stream",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "Stream": "ferry.transport.base",
    "CAFiles": "ferry.transport.certs",
    "HostCertFiles": "ferry.transport.certs",
    "create_ca": "ferry.transport.certs",
    "create_host_cert": "ferry.transport.certs",
    "Handler": "ferry.transport.listener",
    "Listener": "ferry.transport.listener",
    "MemoryStream": "ferry.transport.memory",
    "memory_stream_pair": "ferry.transport.memory",
    "fd_stream": "ferry.transport.pipe",
    "stdio_stream": "ferry.transport.pipe",
    "subprocess_stream": "ferry.transport.pipe",
    "ReceiveIntoStream": "ferry.transport.sockets",
    "SocketStream": "ferry.transport.sockets",
    "AsyncioStream": "ferry.transport.streams",
    "ConnectTimeoutError": "ferry.transport.streams",
    "HalfCloseUnsupportedError": "ferry.transport.streams",
    "connect_tcp": "ferry.transport.tcp",
    "listen_tcp": "ferry.transport.tcp",
    "serve_tcp": "ferry.transport.tcp",
    "TLSStream": "ferry.transport.tls",
    "client_context": "ferry.transport.tls",
    "client_context_for": "ferry.transport.tls",
    "server_context": "ferry.transport.tls",
    "server_context_for": "ferry.transport.tls",
    "connect_unix": "ferry.transport.unix",
    "listen_unix": "ferry.transport.unix",
    "serve_unix": "ferry.transport.unix",
})
