"""Fuzzing the token handshake: whatever bytes a client sends, in whatever
pieces, the server refuses them with AuthenticationError (only the holder of
the token can prove it) and never reads past the handshake; a real client,
with its bytes split anywhere (one at a time included), is accepted and the protocol bytes after the
handshake arrive untouched."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.buffers import Buffer
from ferry.errors import AuthenticationError
from ferry.transport.auth import (
    MAGIC,
    NONCE_BYTES,
    PREAMBLE_BYTES,
    PROOF_BYTES,
    check_token,
    present_token,
)
from ferry.transport.base import Stream
from ferry.transport.memory import memory_stream_pair

TOKEN = "0123456789abcdef" * 4

client_bytes = st.one_of(
    st.binary(max_size=200),
    st.binary(min_size=NONCE_BYTES + PROOF_BYTES, max_size=100).map(lambda b: MAGIC + b),
    st.integers(0, len(MAGIC)).map(lambda n: MAGIC[:n]),
)


async def _send_in_pieces(stream: Stream, data: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        if cut > pos:
            await stream.send_all(data[pos:cut])
            pos = cut


async def _server_reads(data: bytes, cuts: list[int]) -> tuple[bool, int]:
    """(accepted, how many of the client's bytes the server left unread)."""
    client, server = memory_stream_pair()
    await _send_in_pieces(client, data, cuts)
    await client.send_eof()
    try:
        await check_token(server, TOKEN, timeout_s=5)
        accepted = True
    except AuthenticationError:
        accepted = False
    left = b""
    while chunk := await server.receive_some(1 << 16):
        left += chunk
    return accepted, len(left)


@settings(max_examples=400)
@given(client_bytes, st.lists(st.integers(0, 300), max_size=8))
def test_arbitrary_client_bytes_are_refused_and_never_over_read(
    data: bytes, cuts: list[int]
) -> None:
    accepted, left = asyncio.run(_server_reads(data, cuts))
    assert not accepted
    assert left >= max(0, len(data) - PREAMBLE_BYTES - PROOF_BYTES)


class Pieces:
    """Sends each ``send_all`` in the pieces ``cuts`` describes."""

    def __init__(self, inner: Stream, cuts: list[int]) -> None:
        self._inner = inner
        self._cuts = cuts
        self.peer = inner.peer

    async def send_all(self, data: Buffer) -> None:
        await _send_in_pieces(self._inner, bytes(data), self._cuts)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return await self._inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _handshake(cuts: list[int], protocol: bytes) -> bytes:
    client, server = memory_stream_pair()

    async def client_side() -> None:
        await present_token(Pieces(client, cuts), TOKEN, timeout_s=5)
        await client.send_all(protocol)
        await client.send_eof()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(client_side())
        await check_token(Pieces(server, cuts), TOKEN, timeout_s=5)
    got = b""
    while chunk := await server.receive_some(1 << 16):
        got += chunk
    return got


@settings(max_examples=200)
@given(
    st.one_of(st.lists(st.integers(0, 80), max_size=8), st.just(list(range(80)))),
    st.binary(max_size=64),
)
def test_the_right_client_is_accepted_whatever_the_split(
    cuts: list[int], protocol: bytes
) -> None:
    assert asyncio.run(_handshake(cuts, protocol)) == protocol
