"""The host's migration history file: records round-trip, a torn or foreign line costs that
line only, the file stays bounded, and appends from several processes at once (with
compactions among them) lose nothing."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from ferry.node import history
from ferry.node.history import MigrationHistory, MigrationRecord, new_id


def record(n: int = 0, **changes: object) -> MigrationRecord:
    base = MigrationRecord(id=new_id(), vm_id=f"r{n}", to="10.0.0.2:7000", state="succeeded",
                           started=1000.0 + n, finished=1001.5 + n,
                           summary={"downtime_corrected_ms": 9.5}, error=None)
    return MigrationRecord(**{**base.to_json(), **changes})


def test_records_round_trip(tmp_path: Path) -> None:
    h = MigrationHistory(tmp_path / "state")
    assert h.records() == []
    a, b = record(1), record(2, state="failed", summary=None, error="peer went away")
    h.append(a)
    h.append(b)
    assert MigrationHistory(tmp_path / "state").records() == [a, b]
    assert h.find(b.id) == b
    assert h.find(new_id()) is None


@pytest.mark.parametrize("line", [
    '{"id": "mig-0123456789ab", "vm_id": "r1", ',          # torn
    '"just a string"',
    '{"id": "../../etc", "vm_id": "r1", "to": "x", "state": "succeeded", "started": 1}',
    '{"id": "mig-0123456789ab", "vm_id": "r1", "to": "x", "state": "exploded", "started": 1}',
    '{"id": "mig-0123456789ab", "vm_id": "r1", "to": "x", "state": "failed", "started": "1"}',
    '{"id": "mig-0123456789ab", "vm_id": "r1", "to": "x", "state": "failed", "started": 1, '
    '"summary": [1]}',
])
def test_a_bad_line_is_skipped(tmp_path: Path, line: str) -> None:
    h = MigrationHistory(tmp_path)
    first = record(1)
    h.append(first)
    with open(h.path, "a") as f:
        f.write(line + "\n")
    last = record(2)
    h.append(last)
    assert h.records() == [first, last]


def test_the_file_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "KEEP_RECORDS", 5)
    monkeypatch.setattr(history, "COMPACT_AT", 10)
    h = MigrationHistory(tmp_path)
    made = [record(n) for n in range(23)]
    for r in made:
        h.append(r)
        assert len(h.path.read_text().splitlines()) < 10
    assert h.records() == made[-len(h.records()):]
    assert len(h.records()) >= 5


def _append_many(state_root: str, worker: int, count: int) -> None:
    history.KEEP_RECORDS, history.COMPACT_AT = 1000, 40  # compactions among the appends
    h = MigrationHistory(Path(state_root))
    for n in range(count):
        h.append(record(worker * 1000 + n))


def test_concurrent_appends_lose_nothing_recent(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 30)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = (tmp_path / history.FILE_NAME).read_text().splitlines()
    vm_ids = [json.loads(line)["vm_id"] for line in lines]  # every line whole
    assert len(vm_ids) == len(set(vm_ids))
    # Compaction keeps the newest KEEP_RECORDS (1000 here): all 120 are there.
    assert sorted(vm_ids) == sorted(f"r{w * 1000 + n}" for w in range(4) for n in range(30))
