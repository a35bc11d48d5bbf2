"""The link emulator's scheduling core (sans-IO): delay, rate, queue, jitter, loss, frame sizes."""

from __future__ import annotations

import math

import pytest

from ferry.net.errors import NetConfigError
from ferry.testing.linkemu import (
    MIN_QUEUE_BYTES,
    VNET_HDR,
    Lane,
    LinkSpec,
    wire_size,
)


def test_delay_only_adds_half_the_rtt() -> None:
    lane = Lane.for_spec(LinkSpec(rtt_ms=100))
    assert lane.admit(10.0, 1500) == pytest.approx(10.05)
    assert lane.admit(10.001, 64_000) == pytest.approx(10.051)


def test_rate_serialises_frames_back_to_back() -> None:
    lane = Lane.for_spec(LinkSpec(mbit=8))  # 1 byte per microsecond
    arrivals = [lane.admit(0.0, 1000) for _ in range(3)]
    assert arrivals == pytest.approx([0.001, 0.002, 0.003])
    # An idle link starts over from the frame's own time.
    assert lane.admit(1.0, 1000) == pytest.approx(1.001)


def test_rate_and_delay_add_up() -> None:
    lane = Lane.for_spec(LinkSpec(rtt_ms=20, mbit=80))  # 10 bytes/us, 10 ms one way
    assert lane.admit(0.0, 10_000) == pytest.approx(0.001 + 0.010)


def test_full_queue_drops_the_tail() -> None:
    lane = Lane.for_spec(LinkSpec(mbit=8, queue_bytes=3000))
    results = [lane.admit(0.0, 1000) for _ in range(5)]
    # 3000 bytes of queue, counting the frame being serialised: the fourth does not fit.
    assert [r is not None for r in results] == [True, True, True, False, False]
    assert lane.stats.overflowed == 2
    # Once the queue has drained, frames are taken again.
    assert lane.admit(0.004, 1000) is not None


def test_default_queue_is_one_bdp_with_a_floor() -> None:
    assert LinkSpec(rtt_ms=100, mbit=1000).effective_queue_bytes == 12_500_000
    assert LinkSpec(rtt_ms=1, mbit=10).effective_queue_bytes == MIN_QUEUE_BYTES
    assert LinkSpec(rtt_ms=100).effective_queue_bytes is None


def test_jitter_stays_in_bounds_and_never_reorders() -> None:
    lane = Lane.for_spec(LinkSpec(rtt_ms=40, jitter_ms=5, seed=3))
    # Dense frames (0.1 ms apart, closer than the jitter's span): some are held back.
    times = [i * 1e-4 for i in range(2000)]
    arrivals = [a for t in times if (a := lane.admit(t, 100)) is not None]
    assert len(arrivals) == len(times)
    delays = [a - t for a, t in zip(arrivals, times, strict=True)]
    assert arrivals == sorted(arrivals)
    assert min(delays) >= 0.020 - 0.005 - 1e-9
    # Held behind an earlier, slower frame, a delay can exceed 25 ms by the spacing only.
    assert max(delays) <= 0.025 + 1e-9


def test_jitter_spreads_sparse_frames_over_its_range() -> None:
    lane = Lane.for_spec(LinkSpec(rtt_ms=40, jitter_ms=5, seed=4))
    times = [i * 0.011 for i in range(500)]  # farther apart than the jitter's span
    delays = [a - t for t in times if (a := lane.admit(t, 100)) is not None]
    assert len(delays) == len(times)
    assert 0.015 - 1e-9 <= min(delays) < 0.0155
    assert 0.0245 < max(delays) <= 0.025 + 1e-9
    assert abs(sum(delays) / len(delays) - 0.020) < 0.0005


def test_loss_rate_matches_per_segment_probability() -> None:
    lane = Lane.for_spec(LinkSpec(loss=0.05, seed=7))
    n = 40_000
    lost = sum(lane.admit(0.0, 1500) is None for _ in range(n))
    # Binomial: mean 2000, sd ~44; 5 sd either side.
    assert abs(lost - 0.05 * n) < 5 * math.sqrt(n * 0.05 * 0.95)
    assert lane.stats.lost == lost


def test_a_gso_frame_is_lost_if_any_segment_would_be() -> None:
    lane = Lane.for_spec(LinkSpec(loss=0.05, seed=11))
    n = 20_000
    lost = sum(lane.admit(0.0, 64_000, segments=10) is None for _ in range(n))
    expected = 1 - 0.95**10  # about 0.40
    assert abs(lost / n - expected) < 0.02


def test_seeded_lanes_repeat() -> None:
    spec = LinkSpec(rtt_ms=10, jitter_ms=2, loss=0.1, seed=5)
    a, b = Lane.for_spec(spec), Lane.for_spec(spec)
    assert [a.admit(i * 0.001, 100) for i in range(200)] == [
        b.admit(i * 0.001, 100) for i in range(200)]


@pytest.mark.parametrize("kwargs", [
    {"rtt_ms": -1}, {"rtt_ms": math.inf}, {"mbit": 0}, {"mbit": math.nan},
    {"loss": 1.0}, {"loss": -0.1}, {"jitter_ms": -1}, {"queue_bytes": 100},
])
def test_bad_specs_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(NetConfigError):
        LinkSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_json_round_trip_and_unknown_fields() -> None:
    spec = LinkSpec(rtt_ms=100, mbit=1000, loss=0.01, jitter_ms=2, queue_bytes=1 << 20, seed=9)
    assert LinkSpec.from_json(spec.to_json()) == spec
    with pytest.raises(NetConfigError, match="unknown"):
        LinkSpec.from_json({"rtt": 5})


def _frame(gso_type: int, gso_size: int, csum_start: int, tcp_header: int, payload: int) -> bytes:
    vnet = VNET_HDR.pack(1, gso_type, 0, gso_size, csum_start, 16)
    eth_ip = bytes(csum_start)
    tcp = bytearray(tcp_header)
    tcp[12] = (tcp_header // 4) << 4
    return vnet + eth_ip + bytes(tcp) + bytes(payload)


def test_wire_size_of_a_plain_frame_is_its_length() -> None:
    frame = _frame(0, 0, 34, 32, 100)
    assert wire_size(frame) == (34 + 32 + 100, 1)


def test_wire_size_repeats_headers_per_gso_segment() -> None:
    # 10 segments of 1448 bytes behind Ethernet+IP (34) and TCP with timestamps (32).
    frame = _frame(1, 1448, 34, 32, 14_480)
    wire, segments = wire_size(frame)
    assert segments == 10
    assert wire == 10 * (34 + 32 + 1448)
    # A short last segment still counts as one.
    wire, segments = wire_size(_frame(1, 1448, 34, 32, 14_481))
    assert segments == 11


def test_wire_size_tolerates_a_truncated_header() -> None:
    vnet = VNET_HDR.pack(1, 1, 0, 1448, 5000, 16)
    assert wire_size(vnet + bytes(100)) == (100, 1)
