"""QEMU's RAM stream is only started once the destination said it is ready, and a peer
that says anything else (or goes away) is a typed error before QEMU is touched."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from ferry.qemu.ramstream import RAM_READY, RamOut, RamStreamError
from ferry.transport.memory import memory_stream_pair


@dataclass
class UntouchableVM:
    name: str = "vm"
    calls: list[Any] = field(default_factory=list)

    @property
    def qmp(self) -> Any:
        raise AssertionError("QEMU must not be touched before the destination is ready")


@pytest.mark.parametrize("reply", [b"X", b""])
async def test_the_stream_waits_for_the_destination_s_ready(reply: bytes) -> None:
    a, b = memory_stream_pair()
    if reply:
        await b.send_all(reply)
    else:
        await b.aclose()
    with pytest.raises(RamStreamError, match="instead of ready"):
        await RamOut.start(UntouchableVM(), a)  # type: ignore[arg-type]
    assert reply != RAM_READY
