"""Fuzzing the token check: whatever bytes arrive, in whatever pieces, the server
accepts exactly the right preamble, refuses everything else with
AuthenticationError, and never reads past the preamble."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.errors import AuthenticationError
from ferry.transport.auth import MAGIC, PREAMBLE_BYTES, check_token
from ferry.transport.memory import memory_stream_pair

TOKEN = "0123456789abcdef" * 4
RIGHT = MAGIC + TOKEN.encode()


def near_misses() -> st.SearchStrategy[bytes]:
    """The right preamble with one byte changed, cut short, or in full."""
    flip = st.tuples(st.integers(0, PREAMBLE_BYTES - 1), st.integers(1, 255)).map(
        lambda p: RIGHT[: p[0]] + bytes([RIGHT[p[0]] ^ p[1]]) + RIGHT[p[0] + 1 :]
    )
    cut = st.integers(0, PREAMBLE_BYTES - 1).map(lambda n: RIGHT[:n])
    return st.one_of(flip, cut, st.just(RIGHT))


async def _check(data: bytes, cuts: list[int]) -> tuple[bool, bytes]:
    client, server = memory_stream_pair()
    pos = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        if cut > pos:
            await client.send_all(data[pos:cut])
            pos = cut
    if pos < len(data):
        await client.send_all(data[pos:])
    await client.send_eof()
    try:
        await check_token(server, TOKEN, timeout_s=5)
    except AuthenticationError:
        return False, b""
    rest = b""
    while chunk := await server.receive_some(1 << 16):
        rest += chunk
    return True, rest


@settings(max_examples=400)
@given(
    st.one_of(near_misses(), st.binary(max_size=200)),
    st.binary(max_size=64),
    st.lists(st.integers(0, 300), max_size=8),
)
def test_only_the_right_preamble_is_accepted_and_nothing_more_is_read(
    preamble: bytes, protocol: bytes, cuts: list[int]
) -> None:
    accepted, rest = asyncio.run(_check(preamble + protocol, cuts))
    assert accepted == (preamble == RIGHT or (preamble + protocol)[:PREAMBLE_BYTES] == RIGHT)
    if accepted:
        assert rest == (preamble + protocol)[PREAMBLE_BYTES:]
