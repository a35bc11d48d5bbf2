"""Who may talk to a VM endpoint: mutual TLS, a one-time token, or (``--insecure``) anyone.

``ferry vm receive --listen`` takes a VM's memory, disks and device state
from its peer, and ``ferry vm registry`` hands out the memory of trusted
packages, so neither talks to a peer that has not authenticated. An
:class:`Access` says how, for both ends of a link:

* ``tls``: mutual TLS (both sides present a certificate signed by the CA);
* ``token``: plain TCP, then the token preamble of :mod:`ferry.transport.auth`
  (the listening side generates the token; the connecting side presents it);
* ``insecure``: plain TCP and no check, only when asked for explicitly.

TLS and a token may be combined; ``insecure`` excludes both.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError
from ferry.transport import auth
from ferry.transport.base import Stream
from ferry.transport.listener import Listener
from ferry.transport.tcp import TcpAddress, connect_tcp, listen_tcp
from ferry.transport.tls import client_context, server_context
from ferry.transport.tuning import DEFAULT_DEAD_PEER_S, TcpTuning

HANDSHAKE_TIMEOUT_S = auth.HANDSHAKE_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class TLSFiles:
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_json(cls, data: Any) -> TLSFiles | None:
        if not data:
            return None
        return cls(Path(data["cert"]), Path(data["key"]), Path(data["ca"]))

    def to_json(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key), "ca": str(self.ca)}


@dataclass(frozen=True, slots=True)
class Access:
    """How one end of a VM link authenticates the other; see the module docstring."""

    tls: TLSFiles | None = None
    token: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure and (self.tls is not None or self.token is not None):
            raise ConfigError("--insecure excludes TLS and tokens")
        if not self.insecure and self.tls is None and self.token is None:
            raise ConfigError("a VM endpoint needs mutual TLS (--tls-cert/--tls-key/--tls-ca), "
                              "a token (--token-file or $FERRY_TOKEN), or --insecure")
        if self.token is not None:
            auth.validate_token(self.token)

    @classmethod
    def listening(cls, tls: TLSFiles | None, *, insecure: bool = False) -> Access:
        """The serving side's access: TLS if given, else a fresh token, unless ``insecure``."""
        if insecure:
            return cls(insecure=True)
        return cls(tls=tls) if tls is not None else cls(token=auth.new_token())

    def ssl_context(self, *, server: bool) -> ssl.SSLContext | None:
        """The mutual-TLS context of one end of the link (None without TLS)."""
        if self.tls is None:
            return None
        make = server_context if server else client_context
        return make(self.tls.cert, self.tls.key, self.tls.ca)

    async def listen(self, host: str, port: int = 0, *,
                     dead_peer_s: float = DEFAULT_DEAD_PEER_S) -> Listener[TcpAddress]:
        """A TCP listener for VM links (TLS if configured; take peers with :meth:`accept`)."""
        return await listen_tcp(host, port, ssl_context=self.ssl_context(server=True),
                                tuning=TcpTuning(dead_peer_s=dead_peer_s, fit_to_link=True))

    async def accept(self, listener: Listener[TcpAddress]) -> Stream:
        """The first connection that authenticates; silent, garbage or unauthenticated ones
        are dropped (each after at most the handshake timeout) and the listener keeps
        accepting."""
        return await auth.accept_authenticated(listener, self.authenticator(),
                                               handshake_timeout_s=HANDSHAKE_TIMEOUT_S)

    def authenticator(self) -> auth.Authenticate:
        """Server side: what vets a connection once the listener (and TLS) accepted it."""
        if self.token is None:
            return auth.no_authentication
        return auth.token_authenticator(self.token, timeout_s=HANDSHAKE_TIMEOUT_S)

    async def present(self, stream: Stream) -> None:
        """Client side: prove ourselves on a fresh connection (the token, if any)."""
        if self.token is not None:
            await auth.present_token(stream, self.token, timeout_s=HANDSHAKE_TIMEOUT_S)

    async def connect(self, host: str, port: int, *,
                      dead_peer_s: float = DEFAULT_DEAD_PEER_S) -> Stream:
        """Connect to a VM endpoint and authenticate; the stream is closed on failure."""
        stream = await connect_tcp(host, port, ssl_context=self.ssl_context(server=False),
                                   tuning=TcpTuning(dead_peer_s=dead_peer_s, fit_to_link=True))
        try:
            await self.present(stream)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    def to_json(self) -> dict[str, Any]:
        """For the pipe to a detached process or a control request (never argv)."""
        return {"tls": self.tls.to_json() if self.tls else None, "token": self.token,
                "insecure": self.insecure}

    @classmethod
    def from_json(cls, data: Any) -> Access:
        if not isinstance(data, dict):
            raise ConfigError("access must be a JSON object")
        token = data.get("token")
        return cls(tls=TLSFiles.from_json(data.get("tls")),
                   token=str(token) if token is not None else None,
                   insecure=bool(data.get("insecure")))
