"""Which authentication an endpoint uses, and connecting/accepting with it.

The rule (docs/security.md, "Engine endpoints"):

=====================  =============================================================
endpoint               the peer proves itself by
=====================  =============================================================
TCP with TLS config    its certificate (mutual TLS, checked in the TLS handshake)
TCP on loopback        the one-time token (:mod:`ferry.transport.auth`)
TCP elsewhere          TLS only: a token in plaintext would cross the network
UNIX socket            its uid (SO_PEERCRED), ours or root's, checked by both ends;
                       the socket file is also mode 0600
stdio, ``exec:``       nothing more: whoever runs the command (ssh) authenticated it
=====================  =============================================================

``insecure=True`` turns all of it off for plain TCP (the caller warns).
"""

from __future__ import annotations

import enum
import ipaddress
import ssl
from typing import Any

from ferry.errors import ConfigError
from ferry.transport.auth import (
    HANDSHAKE_TIMEOUT_S,
    Authenticate,
    accept_authenticated,
    check_same_user,
    no_authentication,
    present_token,
    same_user,
    token_authenticator,
)
from ferry.transport.base import Stream
from ferry.transport.endpoint import Endpoint, Scheme, connect
from ferry.transport.listener import Listener


class Guard(enum.Enum):
    """How the peer of an endpoint is authenticated."""

    TLS = "mutual TLS"
    TOKEN = "one-time token"
    PEER_UID = "UNIX peer credentials"
    PIPE = "the command that runs us"
    INSECURE = "nothing (--insecure)"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guard_for(endpoint: Endpoint, *, tls: bool, insecure: bool) -> Guard:
    """The authentication ``endpoint`` gets; ConfigError if none applies."""
    match endpoint.scheme:
        case Scheme.STDIO | Scheme.EXEC:
            return Guard.PIPE
        case Scheme.UNIX:
            return Guard.PEER_UID
        case Scheme.TCP:
            if tls:
                return Guard.TLS
            if insecure:
                return Guard.INSECURE
            if is_loopback(endpoint.host):
                return Guard.TOKEN
            raise ConfigError(
                f"plain TCP on {endpoint} would send data and token in clear text: "
                "give --tls-cert/--tls-key/--tls-ca, or --insecure"
            )
    raise ConfigError(f"unsupported endpoint {endpoint}")  # pragma: no cover


def authenticator(guard: Guard, token: str | None) -> Authenticate:
    """What a listener with ``guard`` runs on each connection before accepting it."""
    if guard is Guard.TOKEN:
        if token is None:
            raise ConfigError("a token-guarded endpoint needs a token")
        return token_authenticator(token)
    if guard is Guard.PEER_UID:
        return same_user
    return no_authentication


async def accept_peer(
    listener: Listener[Any],
    guard: Guard,
    token: str | None = None,
    *,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> Stream:
    """Accept connections on ``listener`` until one authenticates as ``guard`` says."""
    return await accept_authenticated(
        listener, authenticator(guard, token), handshake_timeout_s=handshake_timeout_s
    )


async def connect_peer(
    endpoint: Endpoint,
    guard: Guard,
    token: str | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> Stream:
    """Connect to ``endpoint`` and authenticate (and, on UNIX sockets, check the server)."""
    if guard is Guard.TOKEN and token is None:
        raise ConfigError(
            f"{endpoint} needs the source's token: --token-file PATH or $FERRY_TOKEN "
            "(or TLS, or --insecure)"
        )
    stream = await connect(endpoint, ssl_context=ssl_context, server_hostname=server_hostname)
    try:
        if guard is Guard.TOKEN:
            assert token is not None
            await present_token(stream, token, timeout_s=timeout_s)
        elif guard is Guard.PEER_UID:
            check_same_user(stream)
    except BaseException:
        await stream.aclose()
        raise
    return stream
