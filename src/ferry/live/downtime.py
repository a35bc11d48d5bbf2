"""The downtime of a live migration: source paused -> destination running.

That one definition, measured two ways, each named for what it is:

* ``source_view_ms``: source paused -> the source receives the destination's
  acknowledgement of the hand-off, all on the source's clock. The
  destination sends that acknowledgement only once its guest runs (the
  hand-off hook resumes the VM before the receiver answers), so this is an
  upper bound: the true downtime plus the acknowledgement's trip back.
* ``corrected_ms``: source paused (source clock) -> destination running
  (destination clock, moved onto the source's clock by the offset the two
  sides measured, :mod:`ferry.live.clock`), with ``corrected_uncertainty_ms``
  (half the probe's round trip plus the clocks' possible drift). Only
  given when a clock exchange took place; two hosts' raw monotonic clocks
  are never subtracted.

Steps of the downtime (``steps_ms``), in order::

    pause            QMP stop on the source                               source clock
    flush_and_save   final flush of guest RAM through FUSE, overlapped    source clock
                     with the device-state save (QMP migrate, no RAM);
                     both also reported alone as final_flush, state_save
    final_dirty_list the last DirtyList and its DirtyAck (one round trip) source clock
    handoff          the HANDOFF event (with the device state) reaching   crosses hosts:
                     the destination                                      offset-corrected
    state_load       migrate-incoming on the destination (it reads guest  destination clock
                     RAM: virtio rings; absent blocks are fetched)
    cont             QMP cont until QEMU's RESUME event                   destination clock

Steps on one clock are exact; ``handoff`` carries the corrected figure's
uncertainty and is left out without a clock exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferry.live.clock import ClockFigures, ClockOffset
from ferry.live.timeline import Mark, Timeline

SOURCE_STEPS = (("pause", Mark.PAUSE, Mark.PAUSED),
                ("flush_and_save", Mark.PAUSED, Mark.SUSPENDED),
                ("final_dirty_list", Mark.SUSPENDED, Mark.DIRTY_ACKED))
CROSSING_STEP = ("handoff", Mark.DIRTY_ACKED, Mark.HANDOFF_RECEIVED)
DESTINATION_STEPS = (("state_load", Mark.HANDOFF_RECEIVED, Mark.STATE_LOADED),
                     ("cont", Mark.STATE_LOADED, Mark.RUNNING))
OVERLAPPED_STEPS = (("final_flush", Mark.PAUSED, Mark.FLUSHED),
                    ("state_save", Mark.PAUSED, Mark.STATE_SAVED))
STEPS = tuple(name for name, _, _ in (*SOURCE_STEPS, CROSSING_STEP, *DESTINATION_STEPS))
"""The steps that follow one another from pause to running, in order."""
OVERLAPPED = tuple(name for name, _, _ in OVERLAPPED_STEPS)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


@dataclass(frozen=True, slots=True)
class Downtime:
    """The downtime figures the source can stand behind; see the module docstring."""

    source_view_ms: float | None
    corrected_ms: float | None
    corrected_uncertainty_ms: float | None
    steps_ms: dict[str, float]
    clock: ClockFigures | None
    """The offset the corrected figures used (None: no clock exchange took place)."""

    @classmethod
    def measure(cls, source: Timeline, destination: Timeline | None,
                clock: ClockOffset | None) -> Downtime:
        steps: dict[str, float] = {}
        for name, start, end in (*SOURCE_STEPS, *OVERLAPPED_STEPS):
            if (span := _ms(source.span_s(start, end))) is not None:
                steps[name] = span
        corrected = uncertainty = None
        if destination is not None:
            for name, start, end in DESTINATION_STEPS:
                if (span := _ms(destination.span_s(start, end))) is not None:
                    steps[name] = span
            if clock is not None:
                _, start, end = CROSSING_STEP
                sent, arrived = source.at(start), destination.at(end)
                if sent is not None and arrived is not None:
                    steps[CROSSING_STEP[0]] = round((clock.to_source_s(arrived) - sent) * 1e3, 3)
                paused, running = source.at(Mark.PAUSE), destination.at(Mark.RUNNING)
                if paused is not None and running is not None:
                    running_here = clock.to_source_s(running)
                    corrected = _ms(running_here - paused)
                    uncertainty = _ms(clock.uncertainty_s(running_here))
        return cls(source_view_ms=_ms(source.span_s(Mark.PAUSE, Mark.HANDOFF_ACKED)),
                   corrected_ms=corrected, corrected_uncertainty_ms=uncertainty,
                   steps_ms={n: steps[n] for n in (*STEPS, *OVERLAPPED) if n in steps},
                   clock=None if clock is None else clock.figures())

    def to_json(self) -> dict[str, Any]:
        """Keys prefixed ``downtime_`` (they sit beside other figures in a summary)."""
        return {"downtime_source_view_ms": self.source_view_ms,
                "downtime_corrected_ms": self.corrected_ms,
                "downtime_corrected_uncertainty_ms": self.corrected_uncertainty_ms,
                "downtime_steps_ms": dict(self.steps_ms),
                "clock": None if self.clock is None else self.clock.to_json()}
