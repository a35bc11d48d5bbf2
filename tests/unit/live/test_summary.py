"""The summary ``ferry vm migrate`` prints and returns: typed, its keys the documented ones,
its downtime figures named for what they measure."""

from __future__ import annotations

import pytest

from ferry.cli.vm_migrate import downtime_text
from ferry.live.clock import ClockSample, estimate
from ferry.live.report import DestinationReport, SourceReport
from ferry.live.summary import MigrationSummary
from ferry.live.timeline import Mark, Side, Timeline
from ferry.migration.destination import ReceiveReport
from ferry.migration.report import DeviceReport, MigrationReport

KEYS = ["vm", "outcome", "handed_off", "mode", "downtime_source_view_ms",
        "downtime_corrected_ms", "downtime_corrected_uncertainty_ms", "downtime_steps_ms",
        "clock", "total_s", "precopy_s", "postcopy_s", "cycles", "stop_reason", "postcopy_fetches",
        "bytes_total", "wire_bytes", "devices", "verified"]


def timeline(side: Side, marks: dict[Mark, float]) -> Timeline:
    now = [0.0]
    t = Timeline(side, clock=lambda: now[0])
    for mark, at in marks.items():
        now[0] = at
        t.mark(mark)
    return t


def reports() -> tuple[SourceReport, DestinationReport]:
    memory = DeviceReport("memory", 1 << 20, 16, bytes_by_phase={"precopy": 1 << 20},
                          wire_bytes=4096, zero_blocks=15)
    source = SourceReport("r1", outcome="completed", handed_off=True,
                          timeline=timeline(Side.SOURCE, {Mark.PAUSE: 10.0,
                                                          Mark.HANDOFF_ACKED: 10.050}),
                          migration=MigrationReport([memory], cycles=3, total_s=1.5,
                                                    stop_reason="no-progress"))
    destination = DestinationReport(
        "r1", timeline=timeline(Side.DESTINATION, {Mark.RUNNING: 5000.040}),
        receive=ReceiveReport(verified=True))
    return source, destination


def test_keys_and_figures() -> None:
    source, destination = reports()
    clock = estimate([ClockSample(20.0, 5010.0005, 5010.0005, 20.001)])  # offset 4990 s
    data = MigrationSummary.of(source, destination, clock).to_json()
    assert list(data) == KEYS
    assert data["downtime_source_view_ms"] == pytest.approx(50.0)
    assert data["downtime_corrected_ms"] == pytest.approx(40.0, abs=0.5)
    # rtt/2 plus 200 ppm of the 10 s between B running and the exchange
    assert data["downtime_corrected_uncertainty_ms"] == pytest.approx(0.5 + 2.0, abs=0.01)
    assert data["clock"] == {"offset_ms": pytest.approx(4990_000.0), "rtt_ms": 1.0,
                             "samples": 1}
    assert data["devices"] == {"memory": {"size_bytes": 1 << 20,
                                          "bytes_by_phase": {"precopy": 1 << 20},
                                          "zero_blocks": 15, "postcopy_fetches": 0}}
    assert (data["bytes_total"], data["wire_bytes"], data["cycles"]) == (1 << 20, 4096, 3)
    assert data["stop_reason"] == "no-progress"
    assert data["verified"] is True
    text = downtime_text(data)
    assert "offset-corrected" in text
    assert "as the source saw it" in text


def test_without_the_destination_s_report_only_the_source_s_view_is_given() -> None:
    source, _ = reports()
    data = MigrationSummary.of(source, None, None).to_json()
    assert data["downtime_corrected_ms"] is None
    assert data["verified"] is None
    assert downtime_text(data).startswith("50.0 ms as the source saw it")
