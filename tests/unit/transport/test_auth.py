"""The token preamble, token files and accept_authenticated against hostile clients."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from ferry.errors import AuthenticationError, ClosedResourceError, ConfigError
from ferry.transport.auth import (
    CHALLENGE_BYTES,
    MAGIC,
    NONCE_BYTES,
    PREAMBLE_BYTES,
    PROOF_BYTES,
    REFUSED,
    accept_authenticated,
    check_token,
    new_token,
    no_authentication,
    present_token,
    read_token_file,
    same_user,
    token_authenticator,
    token_from,
    write_token_file,
)
from ferry.transport.base import Stream
from ferry.transport.memory import memory_stream_pair
from ferry.transport.tcp import connect_tcp, listen_tcp
from ferry.transport.unix import connect_unix, listen_unix


def test_new_tokens_are_hex_and_distinct() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for t in tokens:
        assert len(t) == 64
        int(t, 16)


async def test_right_token_is_accepted_and_protocol_bytes_follow_untouched() -> None:
    token = new_token()
    client, server = memory_stream_pair()

    async def client_side() -> None:
        await present_token(client, token, timeout_s=5)
        await client.send_all(b"protocol")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(client_side())
        await check_token(server, token, timeout_s=5)
    assert await server.receive_some(100) == b"protocol"


async def _client_closing_on_failure(stream: Stream, token: str) -> None:
    try:
        await present_token(stream, token, timeout_s=5)
    except AuthenticationError:
        await stream.aclose()
        raise


async def test_wrong_token_is_refused_on_both_sides() -> None:
    client, server = memory_stream_pair()
    results = await asyncio.gather(
        _client_closing_on_failure(client, new_token()),
        check_token(server, new_token(), timeout_s=5),
        return_exceptions=True,
    )
    assert all(isinstance(r, AuthenticationError) for r in results), results
    assert "proof does not match" in str(results[0])


async def test_a_client_with_the_wrong_proof_is_refused() -> None:
    token = new_token()
    client, server = memory_stream_pair()
    await client.send_all(MAGIC + bytes(NONCE_BYTES))
    checking = asyncio.create_task(check_token(server, token, timeout_s=5))
    challenge = await client.receive_some(CHALLENGE_BYTES)
    assert len(challenge) == CHALLENGE_BYTES
    await client.send_all(bytes(PROOF_BYTES))
    with pytest.raises(AuthenticationError, match="wrong token"):
        await checking
    assert await client.receive_some(10) == REFUSED


async def test_an_impostor_server_gets_no_proof_from_the_client() -> None:
    """A squatter on the source's port answers with a made-up challenge: the
    client refuses before proving anything, so it never accepts data."""
    client, impostor = memory_stream_pair()

    async def squat() -> bytes:
        await impostor.receive_some(PREAMBLE_BYTES)
        await impostor.send_all(bytes(CHALLENGE_BYTES))
        got = b""
        while chunk := await impostor.receive_some(100):
            got += chunk
        return got

    squatting = asyncio.create_task(squat())
    with pytest.raises(AuthenticationError, match="proof does not match"):
        await _client_closing_on_failure(client, new_token())
    assert await squatting == b""


async def test_garbage_is_refused_at_the_first_wrong_byte() -> None:
    client, server = memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\n")
    with pytest.raises(AuthenticationError, match="did not present a ferry token"):
        await check_token(server, new_token(), timeout_s=5)
    assert await client.receive_some(10) == REFUSED


@pytest.mark.parametrize("cut", [0, 1, len(MAGIC), PREAMBLE_BYTES - 1])
async def test_a_preamble_cut_short_is_refused(cut: int) -> None:
    client, server = memory_stream_pair()
    await client.send_all((MAGIC + bytes(NONCE_BYTES))[:cut])
    await client.send_eof()
    with pytest.raises(AuthenticationError, match="closed during authentication"):
        await check_token(server, new_token(), timeout_s=5)


async def test_a_silent_client_times_out() -> None:
    _client, server = memory_stream_pair()
    with pytest.raises(AuthenticationError, match="no token within"):
        await check_token(server, new_token(), timeout_s=0.05)


async def test_a_server_that_closes_refuses_the_client() -> None:
    client, server = memory_stream_pair()
    await server.aclose()
    with pytest.raises(AuthenticationError):
        await present_token(client, new_token(), timeout_s=5)


def test_malformed_tokens_are_config_errors() -> None:
    for bad in ("", "xyz", "A" * 64, new_token()[:-1]):
        with pytest.raises(ConfigError):
            token_authenticator(bad)


def test_token_file_round_trip_and_mode(tmp_path: Path) -> None:
    token = new_token()
    path = tmp_path / "token"
    write_token_file(path, token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == token
    assert token_from(path, {}) == token


def test_a_token_file_s_missing_directory_is_made_owner_only(tmp_path: Path) -> None:
    """``ferry vm registry --token-file DIR/x.token`` on a host where DIR does not exist
    yet (the e2e registry test run alone): the directory is made, private."""
    token = new_token()
    path = tmp_path / "hosts" / "upc" / "registry.token"
    write_token_file(path, token)
    assert read_token_file(path) == token
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the directory"):
        write_token_file(tmp_path / "a-file" / "token", token)


def test_writing_a_token_file_never_clobbers_another_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token_file(path, new_token())
    token = new_token()
    write_token_file(path, token)  # an earlier token file is replaced
    assert read_token_file(path) == token
    precious = tmp_path / "precious"
    precious.write_bytes(b"do not lose me")
    with pytest.raises(ConfigError, match="not a token file"):
        write_token_file(precious, new_token())
    assert precious.read_bytes() == b"do not lose me"


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token_file(path, new_token())
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_token_file(path)


def test_token_from_environment_and_missing(tmp_path: Path) -> None:
    token = new_token()
    assert token_from(None, {"FERRY_TOKEN": token + "\n"}) == token
    assert token_from(None, {}) is None
    with pytest.raises(ConfigError, match="FERRY_TOKEN"):
        token_from(None, {"FERRY_TOKEN": "nope"})
    with pytest.raises(ConfigError, match="cannot read token file"):
        token_from(tmp_path / "missing", {})


async def _connect_and_present(port: int, token: str) -> Stream:
    stream = await connect_tcp("127.0.0.1", port)
    await present_token(stream, token, timeout_s=5)
    return stream


async def test_accept_authenticated_skips_bad_connections_and_returns_the_good_one() -> None:
    token = new_token()
    async with await listen_tcp() as listener:
        port = listener.address[1]
        silent = await connect_tcp("127.0.0.1", port)
        garbage = await connect_tcp("127.0.0.1", port)
        await garbage.send_all(b"\x00" * PREAMBLE_BYTES)
        wrong = await connect_tcp("127.0.0.1", port)
        await wrong.send_all(MAGIC + bytes(NONCE_BYTES))
        accept = asyncio.create_task(
            accept_authenticated(listener, token_authenticator(token), handshake_timeout_s=5)
        )
        good = await _connect_and_present(port, token)
        server = await accept
        await good.send_all(b"hello")
        assert await server.receive_some(10) == b"hello"
        assert len(await wrong.receive_some(CHALLENGE_BYTES)) == CHALLENGE_BYTES  # no proof sent
        assert await wrong.receive_some(10) == b""
        assert await garbage.receive_some(10) == REFUSED
        # The silent connection was dropped when the winner was chosen.
        assert await silent.receive_some(10) == b""
        for s in (silent, garbage, wrong, good, server):
            await s.aclose()


async def test_accept_authenticated_bounds_connections_vetted_at_once() -> None:
    token = new_token()
    vetting = 0
    most = 0

    async def slow_check(stream: Stream) -> None:
        nonlocal vetting, most
        vetting += 1
        most = max(most, vetting)
        try:
            await check_token(stream, token, timeout_s=60)
        finally:
            vetting -= 1

    async with await listen_tcp() as listener:
        port = listener.address[1]
        idle = [await connect_tcp("127.0.0.1", port) for _ in range(6)]
        accept = asyncio.create_task(
            accept_authenticated(
                listener, slow_check, handshake_timeout_s=0.2, max_unauthenticated=2
            )
        )
        good = await _connect_and_present(port, token)
        server = await accept
        assert most == 2
        for s in (*idle, good, server):
            await s.aclose()


async def test_accept_authenticated_raises_when_the_listener_closes() -> None:
    listener = await listen_tcp()
    accept = asyncio.create_task(accept_authenticated(listener, no_authentication))
    await asyncio.sleep(0)
    await listener.aclose()
    with pytest.raises(ClosedResourceError):
        await accept


async def test_unix_peers_of_our_user_pass_same_user(tmp_path: Path) -> None:
    async with await listen_unix(tmp_path / "s.sock") as listener:
        client = await connect_unix(tmp_path / "s.sock")
        server = await accept_authenticated(listener, same_user)
        await same_user(client)  # the client can check the server the same way
        await client.aclose()
        await server.aclose()


async def test_same_user_refuses_streams_without_credentials() -> None:
    a, _b = memory_stream_pair()
    with pytest.raises(AuthenticationError):
        await same_user(a)


async def test_tls_listener_drops_connections_beyond_the_setup_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ferry.transport import listener as listener_module
    from ferry.transport.certs import create_ca, create_host_cert
    from ferry.transport.tls import server_context_for

    monkeypatch.setattr(listener_module, "MAX_CONNECTION_SETUPS", 2)
    create_ca(tmp_path / "ca")
    files = create_host_cert(tmp_path / "ca", tmp_path / "server", "s", ips=["127.0.0.1"])
    async with await listen_tcp(ssl_context=server_context_for(files)) as listener:
        host, port = listener.address
        silent = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection(host, port)
            silent.append((reader, writer))
        # The first two sit in their TLS handshakes (10 s deadline); the third is
        # dropped at once: it is the first to see EOF.
        reads = {asyncio.create_task(r.read(1)): i for i, (r, _w) in enumerate(silent)}
        done, pending = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        assert [reads[t] for t in done] == [2]
        assert [t.result() for t in done] == [b""]
        for task in pending:
            task.cancel()
        for _r, w in silent:
            w.close()
