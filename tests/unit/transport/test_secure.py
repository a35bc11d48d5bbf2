"""Which guard an endpoint gets, and connect_peer/accept_peer end to end on sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.errors import AuthenticationError, ConfigError
from ferry.transport.auth import new_token
from ferry.transport.endpoint import parse_endpoint
from ferry.transport.secure import Guard, accept_peer, connect_peer, guard_for
from ferry.transport.tcp import listen_tcp
from ferry.transport.unix import listen_unix


@pytest.mark.parametrize(
    ("endpoint", "tls", "insecure", "guard"),
    [
        ("127.0.0.1:7000", False, False, Guard.TOKEN),
        ("tcp://[::1]:7000", False, False, Guard.TOKEN),
        ("localhost:7000", False, False, Guard.TOKEN),
        ("127.0.0.1:7000", True, False, Guard.TLS),
        ("10.0.0.1:7000", True, False, Guard.TLS),
        ("10.0.0.1:7000", False, True, Guard.INSECURE),
        ("127.0.0.1:7000", False, True, Guard.INSECURE),
        ("unix:///run/x.sock", False, True, Guard.PEER_UID),
        ("stdio", False, False, Guard.PIPE),
        ("exec:ssh host ferry serve", False, False, Guard.PIPE),
    ],
)
def test_guard_for(endpoint: str, tls: bool, insecure: bool, guard: Guard) -> None:
    assert guard_for(parse_endpoint(endpoint), tls=tls, insecure=insecure) is guard


def test_plain_tcp_off_loopback_needs_tls_or_insecure() -> None:
    with pytest.raises(ConfigError, match="clear text"):
        guard_for(parse_endpoint("0.0.0.0:7000"), tls=False, insecure=False)


async def test_connect_peer_without_a_token_fails_before_connecting() -> None:
    with pytest.raises(ConfigError, match="FERRY_TOKEN"):
        await connect_peer(parse_endpoint("127.0.0.1:1"), Guard.TOKEN)


async def test_token_guard_over_tcp_end_to_end() -> None:
    token = new_token()
    async with await listen_tcp() as listener:
        endpoint = parse_endpoint(f"127.0.0.1:{listener.address[1]}")
        accepting = asyncio.create_task(accept_peer(listener, Guard.TOKEN, token))
        with pytest.raises(AuthenticationError):
            await connect_peer(endpoint, Guard.TOKEN, new_token())
        client = await connect_peer(endpoint, Guard.TOKEN, token)
        server = await accepting
        await client.send_all(b"x")
        assert await server.receive_some(1) == b"x"
        await client.aclose()
        await server.aclose()


async def test_peer_uid_guard_over_unix_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await listen_unix(path) as listener:
        accepting = asyncio.create_task(accept_peer(listener, Guard.PEER_UID))
        client = await connect_peer(parse_endpoint(f"unix://{path}"), Guard.PEER_UID)
        server = await accepting
        await client.aclose()
        await server.aclose()
