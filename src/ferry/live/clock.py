"""How far the destination's monotonic clock is from the source's, and how sure we are.

Sans-IO: the exchange itself is :mod:`ferry.live.report_exchange`. The
source sends a probe at ``t1`` (its clock); the destination notes its clock
when the probe arrives (``t2``) and when it answers (``t3``); the answer
arrives at ``t4`` (source clock). This is NTP's on-wire calculation::

    offset = ((t2 - t1) + (t3 - t4)) / 2      destination clock - source clock
    rtt    = (t4 - t1) - (t3 - t2)            time on the wire, both ways

If the probe spent ``d1 >= 0`` on the wire and the answer ``d2 >= 0``, the
true offset ``theta`` satisfies ``t2 = t1 + d1 + theta`` and
``t4 = t3 + d2 - theta``, so ``offset = theta + (d1 - d2) / 2`` and
``|offset - theta| <= rtt / 2``: the bound holds whatever the asymmetry.
Of several samples the one with the smallest round trip gives the tightest
bound.

The offset is measured after the migration, not at the instant of the
downtime, and the two clocks need not tick at the same rate: with a rate
error ``e`` the bound becomes ``rtt / 2 + e * (|t - t_measured| + held + rtt)``
(``held = t3 - t2``), with ``e`` = :data:`MAX_DRIFT_PPM`. Both clocks are CLOCK_MONOTONIC,
which NTP may slew by at most 500 ppm (the kernel's MAXFREQ); undisciplined
oscillators are specified within +-100 ppm; two of them, each at most 100
ppm off, drift apart by at most 200 ppm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_DRIFT_PPM = 200.0
"""Relative rate error of two hosts' monotonic clocks (see the module docstring)."""
ROUNDING_S = 1e-6
"""Slack for float rounding of clocks that read up to ~10^9 s (steps of ~10^-7 s)."""


class ClockSampleError(ValueError):
    """Four timestamps that no real exchange can produce (the decoder makes it a
    RemoteProtocolError)."""


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One probe and its answer: ``sent_s``/``answered_s`` on the source's clock,
    ``received_s``/``replied_s`` on the destination's."""

    sent_s: float
    received_s: float
    replied_s: float
    answered_s: float

    def __post_init__(self) -> None:
        stamps = (self.sent_s, self.received_s, self.replied_s, self.answered_s)
        if not all(math.isfinite(t) for t in stamps):
            raise ClockSampleError("a timestamp is not finite")
        if self.answered_s < self.sent_s or self.replied_s < self.received_s:
            raise ClockSampleError("a clock ran backwards")
        # A destination clock running fast may count a hold a little longer than the
        # source saw the whole round trip take, never by more than the drift allows.
        if self.rtt_s < -(self.held_s * MAX_DRIFT_PPM * 1e-6 + ROUNDING_S):
            raise ClockSampleError("the destination claims to have held the probe longer "
                                   "than the whole round trip took")

    @property
    def held_s(self) -> float:
        """How long the destination held the probe (destination clock)."""
        return self.replied_s - self.received_s

    @property
    def rtt_s(self) -> float:
        """Time on the wire, both ways (a hair below 0 is possible, see above)."""
        return (self.answered_s - self.sent_s) - self.held_s

    @property
    def offset_s(self) -> float:
        """Destination clock minus source clock (within +-rtt/2)."""
        return ((self.received_s - self.sent_s) + (self.replied_s - self.answered_s)) / 2


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """The destination's clock minus the source's, measured around ``measured_at_s``."""

    offset_s: float
    rtt_s: float
    """Of the chosen sample, at least 0."""
    held_s: float
    measured_at_s: float
    """When (source clock): the middle of the chosen sample's round trip."""
    samples: int

    def to_source_s(self, destination_s: float) -> float:
        """A destination-clock time on the source's clock."""
        return destination_s - self.offset_s

    def uncertainty_s(self, at_source_s: float) -> float:
        """The bound on :meth:`to_source_s` for a time near ``at_source_s`` (source clock):
        half the round trip, plus what the clocks may drift apart between that time and
        the measurement, and during the measurement itself."""
        drift_window_s = abs(self.measured_at_s - at_source_s) + self.held_s + self.rtt_s
        return self.rtt_s / 2 + drift_window_s * MAX_DRIFT_PPM * 1e-6 + ROUNDING_S

    def figures(self) -> ClockFigures:
        """What a summary shows of this offset."""
        return ClockFigures(offset_ms=round(self.offset_s * 1e3, 3),
                            rtt_ms=round(self.rtt_s * 1e3, 3), samples=self.samples)

    def to_json(self) -> dict[str, float | int]:
        return self.figures().to_json()


@dataclass(frozen=True, slots=True)
class ClockFigures:
    """A :class:`ClockOffset` as a migration summary shows it, rounded to the microsecond.

    Only what a reader of the summary needs; the drift bound's inputs
    (``held_s``, ``measured_at_s``) stay with the offset.
    """

    offset_ms: float
    rtt_ms: float
    samples: int

    def to_json(self) -> dict[str, float | int]:
        return {"offset_ms": self.offset_ms, "rtt_ms": self.rtt_ms, "samples": self.samples}


def estimate(samples: Sequence[ClockSample]) -> ClockOffset:
    """The offset from the sample with the smallest round trip (the tightest bound)."""
    if not samples:
        raise ValueError("no clock samples")
    best = min(samples, key=lambda s: s.rtt_s)
    return ClockOffset(offset_s=best.offset_s, rtt_s=max(best.rtt_s, 0.0), held_s=best.held_s,
                       measured_at_s=(best.sent_s + best.answered_s) / 2, samples=len(samples))
