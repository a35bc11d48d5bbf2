"""The summary ``ferry vm migrate`` prints and returns: typed, its keys the documented ones,
its downtime figures named for what they measure; it round-trips through JSON and a
malformed one (it crosses the control socket) is refused with MalformedSummaryError."""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest
from rich.console import Console

from ferry.cli.vm_migrate import downtime_text, print_summary
from ferry.errors import RemoteProtocolError
from ferry.live.clock import ClockFigures, ClockSample, estimate
from ferry.live.errors import MalformedSummaryError
from ferry.live.report import DestinationReport, SourceReport
from ferry.live.summary import MAX_DEVICES, MAX_PHASES, MAX_STEPS, MigrationSummary
from ferry.live.timeline import Mark, Side, Timeline
from ferry.migration.destination import ReceiveReport
from ferry.migration.policy import Mode, StopReason
from ferry.migration.report import DeviceReport, MigrationReport

KEYS = ["vm", "outcome", "handed_off", "mode", "downtime_source_view_ms",
        "downtime_corrected_ms", "downtime_corrected_uncertainty_ms", "downtime_steps_ms",
        "clock", "total_s", "precopy_s", "postcopy_s", "cycles", "stop_reason", "postcopy_fetches",
        "bytes_total", "wire_bytes", "devices", "verified", "faults", "fault_latency_ms_p50",
        "fault_latency_ms_p90", "fault_latency_ms_max", "fault_latency_ms_sum",
        "fault_latency_buckets"]


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
        receive=ReceiveReport(verified=True), faults=3, fault_wait_ms_p50=1.5,
        fault_wait_ms_p90=4.0, fault_wait_ms_max=4.0, fault_wait_ms_sum=7.0,
        fault_wait_buckets=[0, 0, 0, 2, 1])
    return source, destination


def test_keys_and_figures() -> None:
    source, destination = reports()
    clock = estimate([ClockSample(20.0, 5010.0005, 5010.0005, 20.001)])  # offset 4990 s
    summary = MigrationSummary.of(source, destination, clock)
    data = summary.to_json()
    assert list(data) == KEYS
    assert data["downtime_source_view_ms"] == pytest.approx(50.0)
    assert data["downtime_corrected_ms"] == pytest.approx(40.0, abs=0.5)
    # rtt/2 plus 200 ppm of the 10 s between B running and the exchange
    assert data["downtime_corrected_uncertainty_ms"] == pytest.approx(0.5 + 2.0, abs=0.01)
    assert data["clock"] == {"offset_ms": pytest.approx(4990_000.0), "rtt_ms": 1.0,
                             "samples": 1}
    assert data["devices"] == {"memory": {"size_bytes": 1 << 20,
                                          "bytes_by_phase": {"precopy": 1 << 20},
                                          "zero_blocks": 15, "postcopy_fetches": 0,
                                          "base_blocks": 0}}
    assert (data["bytes_total"], data["wire_bytes"], data["cycles"]) == (1 << 20, 4096, 3)
    assert data["stop_reason"] == "no-progress"
    assert data["verified"] is True
    assert (data["faults"], data["fault_latency_ms_p50"], data["fault_latency_ms_max"]) == (
        3, 1.5, 4.0)
    assert data["fault_latency_buckets"] == [0, 0, 0, 2, 1]
    text = downtime_text(summary)
    assert "offset-corrected" in text
    assert "as the source saw it" in text


def test_without_the_destination_s_report_only_the_source_s_view_is_given() -> None:
    source, _ = reports()
    summary = MigrationSummary.of(source, None, None)
    data = summary.to_json()
    assert data["downtime_corrected_ms"] is None
    assert data["clock"] is None
    assert data["verified"] is None
    assert downtime_text(summary).startswith("50.0 ms as the source saw it")


def full() -> MigrationSummary:
    source, destination = reports()
    clock = estimate([ClockSample(20.0, 5010.0005, 5010.0005, 20.001)])
    return MigrationSummary.of(source, destination, clock)


@pytest.mark.parametrize("summary", [
    full(),
    MigrationSummary.of(reports()[0], None, None),
    MigrationSummary.of(SourceReport("r1", outcome="failed"), None, None),  # no migrator report
], ids=["full", "no-destination-report", "failed-early"])
def test_round_trip_through_json(summary: MigrationSummary) -> None:
    data = json.loads(json.dumps(summary.to_json()))  # as it crosses the control socket
    back = MigrationSummary.from_json(data)
    assert back == summary
    assert back.to_json() == summary.to_json()


def test_typed_fields() -> None:
    summary = MigrationSummary.from_json(full().to_json())
    assert summary.mode is Mode.HYBRID
    assert summary.stop_reason is StopReason.NO_PROGRESS
    assert summary.downtime.clock == ClockFigures(offset_ms=4990_000.0, rtt_ms=1.0, samples=1)
    assert summary.devices["memory"].bytes_by_phase == {"precopy": 1 << 20}


def test_unknown_keys_are_ignored() -> None:
    data = {**full().to_json(), "from_a_newer_ferry": [1, 2]}
    assert MigrationSummary.from_json(data) == full()


def _with(path: str, value: object) -> dict[str, Any]:
    """The full summary's JSON with the field at ``path`` (dotted) set to ``value``
    (``...``: removed)."""
    data = copy.deepcopy(full().to_json())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


MALFORMED: list[tuple[str, object]] = [
    ("vm", ...), ("vm", 7), ("vm", "x" * 5000), ("outcome", None), ("handed_off", "yes"),
    ("handed_off", 1), ("mode", "sideways"), ("mode", 3), ("stop_reason", "bored"),
    ("total_s", "1.5"), ("total_s", float("nan")), ("total_s", True), ("cycles", -1),
    ("cycles", 2.5), ("bytes_total", 1 << 64), ("verified", "true"),
    ("downtime_source_view_ms", float("inf")), ("downtime_steps_ms", [1]),
    ("downtime_steps_ms", {f"s{i}": 1.0 for i in range(MAX_STEPS + 1)}),
    ("downtime_steps_ms", {"pause": "1"}), ("clock", 5), ("clock.samples", -1),
    ("clock.offset_ms", ...), ("devices", []),
    ("devices", {f"d{i}": {} for i in range(MAX_DEVICES + 1)}),
    ("devices.memory", None), ("devices.memory.size_bytes", ...),
    ("devices.memory.zero_blocks", -3), ("devices.memory.bytes_by_phase", {"precopy": -1}),
    ("devices.memory.bytes_by_phase", {f"p{i}": 1 for i in range(MAX_PHASES + 1)}),
]


@pytest.mark.parametrize(("path", "value"), MALFORMED,
                         ids=[f"{p}={v!r:.20}" for p, v in MALFORMED])
def test_malformed_summaries_are_refused(path: str, value: object) -> None:
    with pytest.raises(MalformedSummaryError, match=path.split(".")[0]):
        MigrationSummary.from_json(_with(path, value))


@pytest.mark.parametrize("data", [None, [], "summary", 3])
def test_a_summary_is_an_object(data: object) -> None:
    with pytest.raises(MalformedSummaryError, match="JSON object"):
        MigrationSummary.from_json(data)


def test_a_malformed_summary_is_a_remote_protocol_error() -> None:
    """Whoever sent it is at fault, not the reader (the control codec translates it)."""
    assert issubclass(MalformedSummaryError, RemoteProtocolError)


@pytest.mark.parametrize("summary", [full(), MigrationSummary.of(SourceReport("r1"), None, None)],
                         ids=["full", "no-migrator-report"])
def test_the_cli_prints_a_summary(summary: MigrationSummary) -> None:
    console = Console(file=io.StringIO(), width=200)
    print_summary(console, summary, "10.0.0.2:7521")
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "r1 migrated to 10.0.0.2:7521" in text
    if summary.stop_reason is not None:
        assert "stopped: no-progress" in text
        assert "memory" in text
