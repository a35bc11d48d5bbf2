"""The sans-IO QMP core: parsing (fed one byte at a time), state, limits."""

from __future__ import annotations

import json

import pytest

from ferry.qemu.qmp import (
    MAX_MESSAGE_BYTES,
    ErrorReply,
    Event,
    Greeting,
    QMPProtocol,
    QMPProtocolError,
    QMPState,
    QMPStateError,
    Reply,
)

GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, ' \
           b'"capabilities": ["oob"]}}\r\n'


def _state(proto: QMPProtocol) -> QMPState:
    return proto.state


def _feed_bytewise(proto: QMPProtocol, data: bytes) -> list[object]:
    out: list[object] = []
    for i in range(len(data)):
        out += proto.receive_data(data[i:i + 1])
    return out


def _ready() -> QMPProtocol:
    proto = QMPProtocol()
    proto.receive_data(GREETING)
    msg_id, _ = proto.command("qmp_capabilities")
    proto.receive_data(json.dumps({"return": {}, "id": msg_id}).encode() + b"\r\n")
    assert _state(proto) is QMPState.READY
    return proto


def test_conversation_fed_one_byte_at_a_time() -> None:
    proto = QMPProtocol()
    [greeting] = _feed_bytewise(proto, GREETING)
    assert isinstance(greeting, Greeting)
    assert greeting.capabilities == ("oob",)
    assert _state(proto) is QMPState.NEGOTIATING
    msg_id, data = proto.command("qmp_capabilities")
    assert json.loads(data) == {"execute": "qmp_capabilities", "id": msg_id}
    assert data.endswith(b"\n")
    stream = (json.dumps({"return": {}, "id": msg_id}) + "\r\n").encode()
    assert _feed_bytewise(proto, stream) == [Reply(msg_id, {})]
    assert _state(proto) is QMPState.READY
    stop_id, data = proto.command("migrate", {"uri": "unix:/x"})
    assert json.loads(data)["arguments"] == {"uri": "unix:/x"}
    stream = (b'{"timestamp": {"seconds": 10, "microseconds": 500000}, "event": "STOP"}\r\n'
              + json.dumps({"error": {"class": "GenericError", "desc": "no"},
                            "id": stop_id}).encode() + b"\r\n")
    events = _feed_bytewise(proto, stream)
    assert events == [Event("STOP", {}, 10.5), ErrorReply(stop_id, "GenericError", "no")]


def test_several_messages_in_one_chunk() -> None:
    proto = _ready()
    a, _ = proto.command("query-status")
    b, _ = proto.command("query-migrate")
    data = (json.dumps({"return": {"status": "running"}, "id": a}) + "\r\n"
            + json.dumps({"return": {}, "id": b}) + "\r\n").encode()
    assert proto.receive_data(data[:-5]) == [Reply(a, {"status": "running"})]
    assert proto.receive_data(data[-5:]) == [Reply(b, {})]


def test_commands_before_negotiation_are_refused() -> None:
    proto = QMPProtocol()
    with pytest.raises(QMPStateError):
        proto.command("query-status")
    with pytest.raises(QMPStateError):
        proto.command("qmp_capabilities")  # no greeting yet
    proto.receive_data(GREETING)
    with pytest.raises(QMPStateError):
        proto.command("stop")
    proto.command("qmp_capabilities")
    with pytest.raises(QMPStateError):
        proto.command("qmp_capabilities")  # only once


def test_failed_negotiation_does_not_become_ready() -> None:
    proto = QMPProtocol()
    proto.receive_data(GREETING)
    msg_id, _ = proto.command("qmp_capabilities")
    [reply] = proto.receive_data(json.dumps(
        {"error": {"class": "GenericError", "desc": "bad"}, "id": msg_id}).encode() + b"\n")
    assert isinstance(reply, ErrorReply)
    assert _state(proto) is QMPState.NEGOTIATING


@pytest.mark.parametrize("line", [
    b"not json\n",
    b"[1, 2]\n",
    b'{"return": {}}\n',              # reply without id
    b'{"return": {}, "id": "x"}\n',   # non-integer id
    b'{"something": 1, "id": 3}\n',   # unknown shape
])
def test_malformed_messages_raise_and_close(line: bytes) -> None:
    proto = _ready()
    with pytest.raises(QMPProtocolError):
        proto.receive_data(line)
    assert _state(proto) is QMPState.CLOSED
    with pytest.raises(QMPStateError):
        proto.command("query-status")


def test_message_before_greeting_is_a_protocol_error() -> None:
    with pytest.raises(QMPProtocolError):
        QMPProtocol().receive_data(b'{"return": {}, "id": 1}\n')


def test_second_greeting_is_a_protocol_error() -> None:
    proto = QMPProtocol()
    proto.receive_data(GREETING)
    with pytest.raises(QMPProtocolError):
        proto.receive_data(GREETING)


def test_oversized_line_is_refused_without_a_newline() -> None:
    proto = _ready()
    chunk = b"x" * (1024 * 1024)
    for _ in range(MAX_MESSAGE_BYTES // len(chunk)):
        assert proto.receive_data(chunk) == []
    with pytest.raises(QMPProtocolError, match="longer"):
        proto.receive_data(chunk)
