"""The HANDOFF payload codec: round trip; malformed input is refused with a typed error."""

from __future__ import annotations

import struct

import pytest

from ferry.live import payload as wire
from ferry.live.errors import HandoffPayloadError

SAMPLE = wire.HandoffPayload("vm1", b"QEVM" + bytes(range(256)) * 10, (0x2d00000, 0x2e00000))


def test_round_trip() -> None:
    assert wire.decode(wire.encode(SAMPLE)) == SAMPLE


def test_empty_state_round_trip() -> None:
    p = wire.HandoffPayload("vm")
    assert wire.decode(wire.encode(p)) == p


def test_every_truncation_of_the_header_is_refused() -> None:
    data = wire.encode(wire.HandoffPayload("vm", prefetch=(4096,)))
    for cut in range(len(data)):
        with pytest.raises(HandoffPayloadError):
            wire.decode(data[:cut])


@pytest.mark.parametrize("data", [
    b"XXXX" + struct.pack(">I", 2) + b"{}",
    b"FLV1" + struct.pack(">I", 1 << 30) + b"{}",
    b"FLV1" + struct.pack(">I", 2) + b"{}",                       # fields missing
    b"FLV1" + struct.pack(">I", 5) + b"[1,2]",
    b"FLV1" + struct.pack(">I", 4) + b"\xff\xfe{}",
    b"FLV1" + struct.pack(">I", 29) + b'{"vm":"v","digests":{},"a":1}',  # version 1
    wire.MAGIC + struct.pack(">I", 28) + b'{"vm":1,"digests":{}}       ',
    wire.MAGIC + struct.pack(">I", 23) + b'{"vm":"v","digests":[]}',
    wire.MAGIC + struct.pack(">I", 39) + b'{"vm":"v","digests":{},"prefetch":[-1]}',
    wire.MAGIC + struct.pack(">I", 39) + b'{"vm":"v","digests":{},"prefetch":"ab"}',
])
def test_malformed_payloads_are_refused(data: bytes) -> None:
    with pytest.raises(HandoffPayloadError):
        wire.decode(data)


def test_oversized_header_is_refused_on_encode() -> None:
    big = wire.HandoffPayload("v" * (wire.MAX_HEADER_BYTES + 1))
    with pytest.raises(HandoffPayloadError):
        wire.encode(big)


def test_digests_of_the_release_before_are_read_and_ignored() -> None:
    header = b'{"vm":"v","digests":{"memory":"ab"},"prefetch":[4096]}'
    data = wire.MAGIC + struct.pack(">I", len(header)) + header + b"state"
    assert wire.decode(data) == wire.HandoffPayload("v", b"state", (4096,))
    assert b'"digests":{}' in wire.encode(wire.HandoffPayload("v"))  # still in the header
