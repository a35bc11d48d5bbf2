"""The HANDOFF payload: QEMU's device state and what the destination does with it.

Wire format (sans-IO, all integers big-endian)::

    magic  b"FLV2"        4 bytes
    hlen   u32            length of the JSON header
    header JSON (UTF-8)   {"vm": str, "digests": {},
                           "prefetch": [RAM offsets to warm before the state load]}
    state  bytes          QEMU's device-state stream

``digests`` is always empty: it carried per-device hashes for tests (the
removed ``LiveOptions.record_digests``) and stays in the header so a peer of
the release before still decodes it; it is read and ignored.

The source's timestamps stay on the source (version 1 carried them, and the
destination subtracted its own clock from them: meaningless between hosts).
Carrying the ~60 KB device state here saves the destination one NeedAt
round trip per state block compared with sending it as a dirty device.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from ferry.live.errors import HandoffPayloadError

MAGIC = b"FLV2"
MAX_HEADER_BYTES = 64 * 1024
MAX_PREFETCH = 4096
MAX_STATE_BYTES = 64 * 1024 * 1024
"""The runtime's own cap on a device-state stream (RAM leaking in would exceed it)."""
_HEAD = struct.Struct(">4sI")


@dataclass(frozen=True, slots=True)
class HandoffPayload:
    vm: str
    state: bytes = b""
    prefetch: tuple[int, ...] = ()


def encode(p: HandoffPayload) -> bytes:
    header = json.dumps({"vm": p.vm, "digests": {},
                         "prefetch": list(p.prefetch)},
                        separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise HandoffPayloadError(f"header of {len(header)} bytes is too large")
    if len(p.state) > MAX_STATE_BYTES:
        raise HandoffPayloadError(f"device state of {len(p.state)} bytes is too large")
    return _HEAD.pack(MAGIC, len(header)) + header + p.state


def decode(data: bytes) -> HandoffPayload:
    if len(data) < _HEAD.size:
        raise HandoffPayloadError(f"payload of {len(data)} bytes is shorter than its header")
    magic, hlen = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise HandoffPayloadError(f"bad magic {magic!r}")
    if hlen > MAX_HEADER_BYTES or _HEAD.size + hlen > len(data):
        raise HandoffPayloadError(f"header length {hlen} out of bounds")
    state = data[_HEAD.size + hlen:]
    if len(state) > MAX_STATE_BYTES:
        raise HandoffPayloadError(f"device state of {len(state)} bytes is too large")
    try:
        obj: Any = json.loads(data[_HEAD.size:_HEAD.size + hlen])
        vm, digests = obj["vm"], obj["digests"]
        if not isinstance(vm, str) or not isinstance(digests, dict):
            raise TypeError("wrong field types")
        prefetch = obj.get("prefetch", [])
        if not isinstance(prefetch, list) or len(prefetch) > MAX_PREFETCH or not all(
                isinstance(o, int) and o >= 0 for o in prefetch):
            raise TypeError("prefetch must be a short list of offsets")
    except (ValueError, KeyError, TypeError) as exc:
        raise HandoffPayloadError(f"malformed header: {exc}") from exc
    return HandoffPayload(vm, bytes(state), tuple(prefetch))
