"""Downtime accounting: the steps tile the downtime; missing marks are left out."""

from __future__ import annotations

import pytest

from ferry.live.report import OVERLAPPED, STEPS, DestinationReport, breakdown_ms

SOURCE = {"suspend": 9.0, "pause": 10.0, "paused": 10.001, "flushed": 10.012,
          "state_saved": 10.010, "suspended": 10.0125, "dirty_acked": 10.014}
DEST = {"handoff_received": 10.0145, "state_loaded": 10.030, "running": 10.033}


def test_steps_add_up_to_the_downtime() -> None:
    report = DestinationReport("vm", source_timeline=SOURCE, timeline=DEST)
    steps = report.downtime_steps_ms
    assert set(steps) == {*STEPS, *OVERLAPPED}
    assert report.downtime_ms == pytest.approx(33.0)
    assert sum(steps[s] for s in STEPS) == pytest.approx(33.0)
    assert steps["final_flush"] == pytest.approx(11.0)
    assert steps["state_save"] == pytest.approx(9.0)
    assert steps["state_load"] == pytest.approx(15.5)


def test_missing_marks_leave_steps_out() -> None:
    only_source = breakdown_ms(SOURCE)
    assert "state_load" not in only_source
    assert "cont" not in only_source
    assert only_source["pause"] == pytest.approx(1.0)
    assert DestinationReport("vm", timeline=DEST).downtime_ms is None


def test_json_carries_the_derived_figures() -> None:
    data = DestinationReport("vm", source_timeline=SOURCE, timeline=DEST).to_json()
    assert data["downtime_ms"] == pytest.approx(33.0)
    assert data["downtime_steps_ms"]["handoff"] == pytest.approx(0.5)
