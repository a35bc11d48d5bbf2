"""Fuzzing the two decoders of interactive sessions with hostile bytes.

The agent's codec (session frames, protocol 2) and the holder's interactive
stream codec may only return events, ask for more data, or raise their typed
protocol error: never IndexError, struct.error, ValueError, UnicodeDecodeError.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.guest.agent.errors import AgentProtocolError
from ferry.guest.agent.protocol import HEADER, MAGIC, Decoder, MessageType
from ferry.node import interactive
from ferry.node.interactive import StreamProtocolError

SESSION_TYPES = [MessageType.SESSION_OPEN, MessageType.SESSION_INPUT, MessageType.SESSION_EOF,
                 MessageType.SESSION_RESIZE, MessageType.SESSION_SIGNAL,
                 MessageType.SESSION_ACK, MessageType.SESSION_STARTED,
                 MessageType.SESSION_OUTPUT, MessageType.SESSION_INPUT_ACK,
                 MessageType.SESSION_EXIT]


def _drain_agent(decoder: Decoder) -> None:
    try:
        while decoder.next_frame() is not None:
            pass
    except AgentProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(SESSION_TYPES), payload=st.binary(max_size=300),
       claimed=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_agent_session_payloads(kind: int, payload: bytes, claimed: int | None) -> None:
    length = len(payload) if claimed is None else claimed
    for resync in (False, True):
        decoder = Decoder(resync=resync)
        decoder.receive_data(HEADER.pack(MAGIC, kind, 0, 0, 7, length) + payload)
        _drain_agent(decoder)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(SESSION_TYPES),
       counts=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
       tail=st.binary(max_size=64))
def test_agent_session_payloads_with_forged_lengths(kind: int, counts: list[int],
                                                    tail: bytes) -> None:
    """Length and count fields claiming more than is there (or than the caps allow)."""
    payload = b"\x02" + b"".join(struct.pack(">I", c) for c in counts) + tail
    decoder = Decoder()
    decoder.receive_data(HEADER.pack(MAGIC, kind, 0, 0, 7, len(payload)) + payload)
    _drain_agent(decoder)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=2000), step=st.integers(1, 64))
def test_interactive_stream_random_bytes(data: bytes, step: int) -> None:
    decoder = interactive.Decoder()
    try:
        for i in range(0, len(data), step):
            decoder.receive_data(data[i:i + step])
            while decoder.next_event() is not None:
                pass
    except StreamProtocolError:
        pass
    assert decoder.buffered_bytes <= len(data)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(list(interactive.FrameType)), payload=st.binary(max_size=80))
def test_interactive_stream_plausible_headers(kind: int, payload: bytes) -> None:
    try:
        event = interactive.decode_frame(interactive.HEADER.pack(kind, len(payload)) + payload)
    except StreamProtocolError:
        return
    assert interactive.decode_frame(interactive.encode(event)) == event
