"""The daemon's migration history: records live while running, kept after, bounded, and a
torn or foreign line in its file costs that line only."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.daemon import history
from ferry.daemon.history import MigrationHistory
from ferry.daemon.models import OpState


def test_a_finished_migration_survives_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "state" / "migrations.jsonl"
    h = MigrationHistory(path)
    rec = h.start("op-1", "r1", "10.0.0.2:7000")
    h.progress(rec.id, {"phase": "precopy", "bytes_sent": 10})
    assert h.get(rec.id).progress == {"phase": "precopy", "bytes_sent": 10}  # type: ignore[union-attr]
    assert not path.exists()  # only finished records are written
    h.finish(rec.id, OpState.SUCCEEDED, summary={"downtime_corrected_ms": 9.5})
    h.finish(rec.id, OpState.FAILED)  # a second outcome is ignored
    again = MigrationHistory(path)
    [loaded] = again.all()
    assert loaded == h.get(rec.id)
    assert (loaded.state, loaded.progress, loaded.summary) == (
        OpState.SUCCEEDED, None, {"downtime_corrected_ms": 9.5})


def test_a_torn_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "migrations.jsonl"
    h = MigrationHistory(path)
    for n in range(2):
        h.finish(h.start(f"op-{n}", "r1", "b:1").id, OpState.SUCCEEDED)
    with open(path, "a") as f:
        f.write('{"id": "mig-torn", "operation": ')  # the daemon died mid-write
    assert [r.operation for r in MigrationHistory(path).all()] == ["op-0", "op-1"]


def test_the_file_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "KEEP_RECORDS", 5)
    path = tmp_path / "migrations.jsonl"
    h = MigrationHistory(path)
    for n in range(23):
        h.finish(h.start(f"op-{n}", "r1", "b:1").id, OpState.FAILED, error={"detail": "x"})
        assert len(path.read_text().splitlines()) <= 2 * 5
    assert [r.operation for r in MigrationHistory(path).all()] == [
        f"op-{n}" for n in range(18, 23)]
