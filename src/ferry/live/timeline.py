"""The suspend/hand-off sequence of a live migration, as typed marks on one host's clock.

Each side keeps its own :class:`Timeline`: the source marks the steps it
sees on its CLOCK_MONOTONIC, the destination on its own. Two hosts'
monotonic clocks count from their own boots, so a mark of one side is never
subtracted from a mark of the other: durations inside one timeline are
exact, and a step that crosses hosts needs the clock offset the two sides
measured (:mod:`ferry.live.clock`, :mod:`ferry.live.downtime`).

Source marks, in order::

    SUSPEND           suspend hook entered (the agent's before-suspend hooks run, guest runs)
    PAUSE             QMP stop sent: the downtime starts (RAM in QEMU's stream: QEMU's
                      STOP event at its switch-over, the guest paused by QEMU itself)
    PAUSED            QMP stop answered
    FLUSHED           final flush of guest RAM done      } overlapped
    STATE_SAVED       device state saved (QMP migrate)   }
    SUSPENDED         both done
    DIRTY_ACKED       the final DirtyList sent (the HANDOFF payload is built; its ack is
                      awaited with the hand-off's, the name is historical)
    HANDOFF_ACKED     the destination acknowledged the hand-off: it sends that
                      acknowledgement only once its guest runs

Destination marks::

    HANDOFF_RECEIVED  the HANDOFF event arrived
    STATE_LOADED      device state loaded (migrate-incoming)
    RUNNING           QEMU's RESUME event: the downtime ends
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ferry.errors import RemoteProtocolError
from ferry.live import checks

Clock = Callable[[], float]
"""Seconds on a monotonic clock (``time.monotonic``; tests pass simulated clocks)."""


class Side(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class Mark(enum.Enum):
    """A step boundary of the suspend/hand-off sequence (see the module docstring)."""

    SUSPEND = "suspend"
    PAUSE = "pause"
    PAUSED = "paused"
    FLUSHED = "flushed"
    STATE_SAVED = "state_saved"
    SUSPENDED = "suspended"
    DIRTY_ACKED = "dirty_acked"
    HANDOFF_ACKED = "handoff_acked"
    HANDOFF_RECEIVED = "handoff_received"
    STATE_LOADED = "state_loaded"
    RUNNING = "running"

    @property
    def side(self) -> Side:
        """The host whose clock this mark is read on."""
        return Side.DESTINATION if self in _DESTINATION_MARKS else Side.SOURCE


_DESTINATION_MARKS = frozenset({Mark.HANDOFF_RECEIVED, Mark.STATE_LOADED, Mark.RUNNING})


@dataclass(slots=True)
class Timeline:
    """The marks one side recorded, each on that side's own clock."""

    side: Side
    clock: Clock = field(default=time.monotonic, repr=False, compare=False)
    _marks: dict[Mark, float] = field(default_factory=dict)

    def mark(self, mark: Mark) -> float:
        """Record ``mark`` now (again if it was recorded before) and return the time."""
        self._check(mark)
        now = self.clock()
        self._marks[mark] = now
        return now

    def mark_at(self, mark: Mark, when: float) -> None:
        """Record ``mark`` at ``when`` (on this side's clock), seen after the fact."""
        self._check(mark)
        self._marks[mark] = when

    def at(self, mark: Mark) -> float | None:
        """When ``mark`` was recorded, on this side's clock (None if it was not)."""
        self._check(mark)
        return self._marks.get(mark)

    def span_s(self, start: Mark, end: Mark) -> float | None:
        """``end - start`` on this side's clock (None if either is missing)."""
        a, b = self.at(start), self.at(end)
        return None if a is None or b is None else b - a

    def to_json(self) -> dict[str, float]:
        return {m.value: t for m, t in self._marks.items()}

    @classmethod
    def from_json(cls, side: Side, data: object) -> Timeline:
        """A peer's timeline: only known marks of ``side``, each a finite number
        (RemoteProtocolError otherwise)."""
        if not isinstance(data, Mapping) or len(data) > len(Mark):
            raise RemoteProtocolError(f"a timeline is an object of at most {len(Mark)} marks")
        timeline = cls(side)
        for key, value in data.items():
            try:
                mark = Mark(key)
            except ValueError:
                raise RemoteProtocolError(f"unknown timeline mark {key!r:.40}") from None
            if mark.side is not side:
                raise RemoteProtocolError(f"{mark.value} is not a {side.value} mark")
            try:
                timeline._marks[mark] = checks.finite(value, f"timeline mark {mark.value}")
            except ValueError as exc:
                raise RemoteProtocolError(str(exc)) from None
        return timeline

    def _check(self, mark: Mark) -> None:
        if mark.side is not self.side:  # a bug: each side only ever reads its own clock
            raise ValueError(f"{mark.value} is a {mark.side.value} mark, this is the "
                             f"{self.side.value}'s timeline")
