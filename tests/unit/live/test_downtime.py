"""The downtime across two hosts: typed timelines on each host's own clock, the NTP-style
clock offset and its bound, and the figures put together from them.

The cross-host cases simulate two machines: events happen at "true" times, the source
reads them on a clock equal to true time, the destination on a clock 10^6 s ahead (and,
in one case, running 150 ppm fast); the exchange's messages take asymmetric times on
the wire. The corrected downtime must land within its stated uncertainty of the true one,
and no figure may be the raw difference of the two clocks.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.errors import RemoteProtocolError
from ferry.live.clock import MAX_DRIFT_PPM, ClockSample, ClockSampleError, estimate
from ferry.live.downtime import OVERLAPPED, STEPS, Downtime
from ferry.live.timeline import Mark, Side, Timeline

# True times (s) of one migration's suspend and hand-off; the downtime is 33.0 ms.
SOURCE_EVENTS = {Mark.SUSPEND: 99.0, Mark.PAUSE: 100.0, Mark.PAUSED: 100.001,
                 Mark.FLUSHED: 100.012, Mark.STATE_SAVED: 100.010, Mark.SUSPENDED: 100.0125,
                 Mark.DIRTY_ACKED: 100.014, Mark.HANDOFF_ACKED: 100.0338}
DESTINATION_EVENTS = {Mark.HANDOFF_RECEIVED: 100.0145, Mark.STATE_LOADED: 100.030,
                      Mark.RUNNING: 100.033}
TRUE_DOWNTIME_MS = 33.0
OFFSET_S = 1e6


class SimulatedClock:
    """A host clock: ``offset_s + true * (1 + rate_ppm / 1e6)``, read at a settable true time."""

    def __init__(self, offset_s: float = 0.0, rate_ppm: float = 0.0) -> None:
        self.offset_s, self.rate, self.true_s = offset_s, 1 + rate_ppm * 1e-6, 0.0

    def at(self, true_s: float) -> float:
        return self.offset_s + true_s * self.rate

    def __call__(self) -> float:
        return self.at(self.true_s)


def record(side: Side, clock: SimulatedClock, events: dict[Mark, float]) -> Timeline:
    timeline = Timeline(side, clock=clock)
    for mark, true_s in events.items():
        clock.true_s = true_s
        timeline.mark(mark)
    return timeline


def exchange(src: SimulatedClock, dst: SimulatedClock, start_s: float, *,
             there_s: float, held_s: float, back_s: float) -> ClockSample:
    """One probe sent at true ``start_s``, on the wire ``there_s`` and ``back_s``."""
    t2 = start_s + there_s
    t3 = t2 + held_s
    return ClockSample(src.at(start_s), dst.at(t2), dst.at(t3), src.at(t3 + back_s))


def two_hosts(rate_ppm: float = 0.0) -> tuple[Timeline, Timeline, SimulatedClock,
                                              SimulatedClock]:
    src, dst = SimulatedClock(), SimulatedClock(OFFSET_S, rate_ppm)
    return record(Side.SOURCE, src, SOURCE_EVENTS), record(Side.DESTINATION, dst,
                                                           DESTINATION_EVENTS), src, dst


def test_cross_host_downtime_is_right_within_its_uncertainty() -> None:
    source, destination, src, dst = two_hosts()
    # The exchange runs 5 s after the hand-off; the quickest of three probes is
    # asymmetric (0.3 ms there, 0.5 ms back), which only the bound covers.
    samples = [exchange(src, dst, 105.0, there_s=0.0003, held_s=0.0001, back_s=0.0005),
               exchange(src, dst, 105.01, there_s=0.004, held_s=0.0001, back_s=0.001),
               exchange(src, dst, 105.02, there_s=0.002, held_s=0.0002, back_s=0.002)]
    clock = estimate(samples)
    assert clock.rtt_s == pytest.approx(0.0008)
    assert clock.offset_s == pytest.approx(OFFSET_S - 0.0001, abs=1e-7)
    d = Downtime.measure(source, destination, clock)
    assert d.corrected_ms is not None
    assert d.corrected_uncertainty_ms is not None
    assert abs(d.corrected_ms - TRUE_DOWNTIME_MS) <= d.corrected_uncertainty_ms
    assert d.corrected_uncertainty_ms == pytest.approx(0.4 + 5 * MAX_DRIFT_PPM * 1e-3, abs=0.02)
    # The source's view (pause -> the "running" acknowledgement) bounds it from above.
    assert d.source_view_ms is not None
    assert d.source_view_ms == pytest.approx(33.8)
    assert d.source_view_ms >= d.corrected_ms - d.corrected_uncertainty_ms
    # No figure is the raw difference of the two clocks (10^9 ms away).
    figures = [d.corrected_ms, d.source_view_ms, *d.steps_ms.values()]
    assert all(abs(f) < 1000 for f in figures)
    assert list(d.steps_ms) == [*STEPS, *OVERLAPPED]
    assert d.steps_ms["handoff"] == pytest.approx(0.5, abs=d.corrected_uncertainty_ms)
    assert d.steps_ms["state_load"] == pytest.approx(15.5)
    assert d.steps_ms["final_flush"] == pytest.approx(11.0)


def test_a_drifting_destination_clock_stays_within_the_bound() -> None:
    source, destination, src, dst = two_hosts(rate_ppm=150.0)
    clock = estimate([exchange(src, dst, 105.0, there_s=0.0002, held_s=0.0, back_s=0.0002)])
    d = Downtime.measure(source, destination, clock)
    assert d.corrected_ms is not None
    assert d.corrected_uncertainty_ms is not None
    # Without the drift term the 0.75 ms error (150 ppm x 5 s) would exceed rtt/2 = 0.2 ms.
    assert abs(d.corrected_ms - TRUE_DOWNTIME_MS) > clock.rtt_s / 2 * 1e3
    assert abs(d.corrected_ms - TRUE_DOWNTIME_MS) <= d.corrected_uncertainty_ms


@given(offset_s=st.floats(-1e9, 1e9), rate_ppm=st.floats(-MAX_DRIFT_PPM, MAX_DRIFT_PPM),
       there_s=st.floats(0, 0.05), back_s=st.floats(0, 0.05), held_s=st.floats(0, 0.01),
       later_s=st.floats(0.01, 60))
def test_the_bound_holds_for_any_offset_asymmetry_and_drift(
        offset_s: float, rate_ppm: float, there_s: float, back_s: float, held_s: float,
        later_s: float) -> None:
    src, dst = SimulatedClock(), SimulatedClock(offset_s, rate_ppm)
    source = record(Side.SOURCE, src, SOURCE_EVENTS)
    destination = record(Side.DESTINATION, dst, DESTINATION_EVENTS)
    start = DESTINATION_EVENTS[Mark.RUNNING] + later_s
    clock = estimate([exchange(src, dst, start, there_s=there_s, held_s=held_s,
                               back_s=back_s)])
    d = Downtime.measure(source, destination, clock)
    assert d.corrected_ms is not None
    assert d.corrected_uncertainty_ms is not None
    # The figures are rounded to the microsecond.
    assert abs(d.corrected_ms - TRUE_DOWNTIME_MS) <= d.corrected_uncertainty_ms + 1e-3


def test_without_a_clock_exchange_nothing_crosses_hosts() -> None:
    source, destination, _, _ = two_hosts()
    d = Downtime.measure(source, destination, None)
    assert d.corrected_ms is None
    assert d.corrected_uncertainty_ms is None
    assert "handoff" not in d.steps_ms
    assert d.steps_ms["cont"] == pytest.approx(3.0)  # one clock: exact without the offset
    assert d.source_view_ms == pytest.approx(33.8)
    assert d.to_json()["clock"] is None


def test_only_the_source_timeline_gives_the_source_steps() -> None:
    source, _, _, _ = two_hosts()
    d = Downtime.measure(source, None, None)
    assert set(d.steps_ms) == {"pause", "flush_and_save", "final_dirty_list", *OVERLAPPED}


def test_the_quickest_sample_is_chosen() -> None:
    slow = ClockSample(0.0, 10.5, 10.5, 1.0)
    quick = ClockSample(2.0, 12.01, 12.02, 2.03)
    clock = estimate([slow, quick])
    assert clock.rtt_s == pytest.approx(0.02)
    assert clock.offset_s == pytest.approx(10.0)
    assert clock.samples == 2


@pytest.mark.parametrize("stamps", [
    (1.0, 5.0, 4.0, 2.0),            # the destination's clock ran backwards
    (2.0, 5.0, 6.0, 1.0),            # the source's clock ran backwards
    (0.0, 5.0, 7.0, 1.0),            # held 2 s inside a 1 s round trip
    (0.0, float("nan"), 1.0, 1.0),
])
def test_impossible_samples_are_refused(stamps: tuple[float, float, float, float]) -> None:
    with pytest.raises(ClockSampleError):
        ClockSample(*stamps)


def test_a_timeline_takes_only_its_own_side_s_marks() -> None:
    with pytest.raises(ValueError, match="destination mark"):
        Timeline(Side.SOURCE).mark(Mark.RUNNING)
    with pytest.raises(ValueError, match="source mark"):
        Timeline(Side.DESTINATION).at(Mark.PAUSE)


def test_timeline_json_round_trip() -> None:
    source, _, _, _ = two_hosts()
    again = Timeline.from_json(Side.SOURCE, source.to_json())
    assert again.to_json() == source.to_json()
    assert again.span_s(Mark.PAUSE, Mark.PAUSED) == pytest.approx(0.001)


@pytest.mark.parametrize("data", [
    [], {"pause": 1.0},                                   # a list; a source mark
    {"running": "1"}, {"running": float("inf")}, {"running": True},
    {"nonsense": 1.0}, {f"m{i}": 1.0 for i in range(100)},
])
def test_a_peer_s_malformed_timeline_is_refused(data: object) -> None:
    with pytest.raises(RemoteProtocolError):
        Timeline.from_json(Side.DESTINATION, data)
