"""The sans-IO core's TLS handling: STARTTLS, NBD_REP_ERR_TLS_REQD, the upgrade."""

from __future__ import annotations

import struct

import pytest

from ferry.expose.nbd.errors import (
    NBDLocalProtocolError,
    NBDRemoteProtocolError,
    NBDTLSRequiredError,
)
from ferry.expose.nbd.protocol import (
    Event,
    ExportInfo,
    ExportSelected,
    HandshakeAborted,
    OptionReceived,
    Phase,
    ServerConnection,
    Signal,
    TLSMode,
    TLSRequested,
)

from .nbd_helpers import go_payload, option, parse_option_replies

EXPORTS = {"disk": ExportInfo(1 << 20), "ro": ExportInfo(4096, read_only=True)}
ACK, SERVER, INFO = 1, 2, 3
ERR_UNSUP, ERR_INVALID, ERR_TLS_REQD = 2**31 + 1, 2**31 + 3, 2**31 + 5
STARTTLS, ABORT, LIST, EXPORT_NAME, INFO_OPT, GO, STRUCTURED = 5, 2, 3, 1, 6, 7, 8
FLAGS = struct.pack(">I", 3)
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))
"""Stand-in for the first bytes of a TLS ClientHello: the core must hand
them over untouched, whatever they are."""


def drain(conn: ServerConnection) -> list[Event]:
    """Events until the core needs data, closes, or waits for the TLS upgrade."""
    events: list[Event] = []
    while conn.phase is not Phase.STARTING_TLS:
        ev = conn.next_event()
        if ev is Signal.NEED_DATA or ev is Signal.CLOSED:
            break
        assert not isinstance(ev, Signal)
        events.append(ev)
    return events


def feed_bytewise(conn: ServerConnection, data: bytes) -> list[Event]:
    """Feed one byte at a time, draining after each, so every split point is tried."""
    events: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events += drain(conn)
    return events


def phase_of(conn: ServerConnection) -> Phase:
    """Read the phase afresh (a plain attribute read lets mypy narrow across calls)."""
    return conn.phase


def required() -> ServerConnection:
    conn = ServerConnection(EXPORTS, tls=TLSMode.REQUIRED)
    conn.data_to_send()  # the greeting
    return conn


def upgraded() -> ServerConnection:
    """A REQUIRED connection whose TLS handshake (done elsewhere) succeeded."""
    conn = required()
    conn.receive_data(FLAGS + option(STARTTLS))
    assert drain(conn) == [TLSRequested()]
    assert conn.take_unparsed() == b""
    conn.tls_established()
    conn.data_to_send()
    return conn


def test_every_option_but_starttls_and_abort_needs_tls_first() -> None:
    conn = required()
    wire = (
        FLAGS
        + option(LIST)
        + option(GO, go_payload("disk"))
        + option(INFO_OPT, go_payload("disk"))
        + option(STRUCTURED)
        + option(99, b"junk")
        + option(STARTTLS, b"x")  # STARTTLS carries no data
        + option(ABORT)
    )
    events = feed_bytewise(conn, wire)
    assert isinstance(events[-1], HandshakeAborted)
    assert all(isinstance(e, OptionReceived) for e in events[:-1])
    assert conn.phase is Phase.CLOSED
    assert not conn.tls_active
    assert not conn.structured_replies  # the refused option changed nothing
    replies = parse_option_replies(conn.data_to_send())
    assert [(opt, rtype) for opt, rtype, _ in replies] == [
        (LIST, ERR_TLS_REQD),
        (GO, ERR_TLS_REQD),
        (INFO_OPT, ERR_TLS_REQD),
        (STRUCTURED, ERR_TLS_REQD),
        (99, ERR_TLS_REQD),
        (STARTTLS, ERR_INVALID),
        (ABORT, ACK),
    ]
    assert b"STARTTLS" in replies[0][2]  # the message tells the client what to do


def test_export_name_before_tls_ends_the_session() -> None:
    conn = required()
    with pytest.raises(NBDTLSRequiredError) as info:
        feed_bytewise(conn, FLAGS + option(EXPORT_NAME, b"disk"))
    assert isinstance(info.value, NBDRemoteProtocolError)
    assert conn.export is None
    # Nothing was promised: no export size or flags went out.
    assert conn.data_to_send() == b""


def test_starttls_byte_at_a_time_hands_over_the_tls_bytes() -> None:
    conn = required()
    events = feed_bytewise(conn, FLAGS + option(STARTTLS) + CLIENT_HELLO)
    assert events == [TLSRequested()]
    assert phase_of(conn) is Phase.STARTING_TLS
    assert parse_option_replies(conn.data_to_send()) == [(STARTTLS, ACK, b"")]
    # The bytes behind the option belong to TLS, not to the NBD parser.
    assert conn.take_unparsed() == CLIENT_HELLO
    assert conn.take_unparsed() == b""
    conn.tls_established()
    assert conn.tls_active
    assert phase_of(conn) is Phase.OPTIONS


def test_the_core_parses_nothing_until_tls_is_established() -> None:
    conn = required()
    conn.receive_data(FLAGS + option(STARTTLS))
    assert drain(conn) == [TLSRequested()]
    with pytest.raises(NBDLocalProtocolError, match="tls_established"):
        conn.next_event()


def test_tls_established_refuses_leftover_plaintext() -> None:
    conn = required()
    conn.receive_data(FLAGS + option(STARTTLS) + CLIENT_HELLO)
    assert drain(conn) == [TLSRequested()]
    with pytest.raises(NBDLocalProtocolError, match="take_unparsed"):
        conn.tls_established()


@pytest.mark.parametrize("mode", [TLSMode.NONE, TLSMode.REQUIRED])
def test_upgrade_calls_outside_starting_tls_are_our_bug(mode: TLSMode) -> None:
    conn = ServerConnection(EXPORTS, tls=mode)
    with pytest.raises(NBDLocalProtocolError):
        conn.take_unparsed()
    with pytest.raises(NBDLocalProtocolError):
        conn.tls_established()


def test_after_tls_haggling_works_as_usual_byte_at_a_time() -> None:
    conn = upgraded()
    wire = option(STARTTLS) + option(LIST) + option(STRUCTURED) + option(GO, go_payload("ro"))
    events = feed_bytewise(conn, wire)
    assert events[-1] == ExportSelected("ro", EXPORTS["ro"], structured_replies=True)
    assert conn.phase is Phase.TRANSMISSION
    replies = parse_option_replies(conn.data_to_send())
    kinds = [(opt, rtype) for opt, rtype, _ in replies]
    # A second STARTTLS is invalid; TLS_REQD is never sent once TLS is up.
    assert kinds[0] == (STARTTLS, ERR_INVALID)
    assert kinds[1:4] == [(LIST, SERVER), (LIST, SERVER), (LIST, ACK)]
    assert kinds[4] == (STRUCTURED, ACK)
    assert kinds[-1] == (GO, ACK)
    assert all(rtype != ERR_TLS_REQD for _, rtype in kinds)
    assert {rtype for opt, rtype in kinds if opt == GO} == {INFO, ACK}


def test_export_name_after_tls_is_accepted() -> None:
    conn = upgraded()
    conn.receive_data(option(EXPORT_NAME, b"disk"))
    assert drain(conn) == [ExportSelected("disk", EXPORTS["disk"], False)]
    assert struct.unpack_from(">Q", conn.data_to_send())[0] == 1 << 20


def test_without_tls_starttls_is_unsupported() -> None:
    conn = ServerConnection(EXPORTS)  # TLSMode.NONE, as on UNIX sockets
    conn.data_to_send()
    events = feed_bytewise(conn, FLAGS + option(STARTTLS) + option(GO, go_payload("disk")))
    assert isinstance(events[-1], ExportSelected)
    assert not conn.tls_active
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0][:2] == (STARTTLS, ERR_UNSUP)
    assert all(rtype != ERR_TLS_REQD for _, rtype, _ in replies)
