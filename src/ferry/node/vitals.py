"""What a holder watches while it holds a VM: the guest agent's liveness and guest RAM's
dirty rate, for ``status`` (the daemon's metrics, ``ferry vm inspect``).

* the agent answers a ping every :data:`AGENT_EVERY_S`; it is *up* while its last answer
  is at most :data:`AGENT_STALE_S` old (an agent busy with a long ``exec`` still
  answers: it serves requests concurrently);
* QEMU measures the dirty rate (``calc-dirty-rate``, page sampling, 1 s) every
  :data:`DIRTY_EVERY_S`.

Neither runs while a migration is under way (it owns the agent's hooks and QMP's
migration state), and a failure of either is recorded, never raised: the VM's holder
must not end because a probe failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferry.errors import FerryError
from ferry.guest.agent import AgentClient
from ferry.qemu import QemuVM

log = logging.getLogger(__name__)

AGENT_EVERY_S = 5.0
AGENT_TIMEOUT_S = 5.0
AGENT_STALE_S = 3 * AGENT_EVERY_S
DIRTY_EVERY_S = 30.0
FIRST_DIRTY_AFTER_S = 5.0


@dataclass(slots=True)
class Vitals:
    agent_ok_at: float | None = None
    """``time.monotonic()`` of the agent's last answer."""
    agent_rtt_ms: float | None = None
    agent_failures: int = 0
    dirty_mib_s: float | None = None
    dirty_at: float | None = None
    """``time.monotonic()`` of the last dirty-rate measurement."""

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        age = None if self.agent_ok_at is None else round(now - self.agent_ok_at, 3)
        return {"agent_up": age is not None and age <= AGENT_STALE_S,
                "agent_last_ok_s": age, "agent_rtt_ms": self.agent_rtt_ms,
                "agent_failures": self.agent_failures,
                "dirty_rate_mib_s": self.dirty_mib_s,
                "dirty_rate_age_s": None if self.dirty_at is None
                else round(now - self.dirty_at, 3)}


async def watch(vitals: Vitals, qemu: QemuVM, agent: AgentClient | None,
                busy: Callable[[], bool]) -> None:
    """Probe until cancelled; ``busy()`` true (a migration runs) skips a round."""
    next_dirty = time.monotonic() + FIRST_DIRTY_AFTER_S
    while True:
        if not busy() and agent is not None:
            t0 = time.monotonic()
            try:
                await agent.ping(timeout_s=AGENT_TIMEOUT_S)
            except (FerryError, OSError) as exc:
                vitals.agent_failures += 1
                log.debug("agent ping failed: %s", exc)
            else:
                vitals.agent_ok_at = time.monotonic()
                vitals.agent_rtt_ms = round((vitals.agent_ok_at - t0) * 1e3, 3)
        if not busy() and time.monotonic() >= next_dirty:
            next_dirty = time.monotonic() + DIRTY_EVERY_S
            with contextlib.suppress(FerryError, OSError):
                vitals.dirty_mib_s = round(await qemu.measure_dirty_rate(), 3)
                vitals.dirty_at = time.monotonic()
        await asyncio.sleep(AGENT_EVERY_S)
