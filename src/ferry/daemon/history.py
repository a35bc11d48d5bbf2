"""The migrations this node's daemon started: live while they run, kept after.

Each outgoing migration (``POST /v1/vms/{id}/migrate``) is a record here from its
start: its progress while it runs, then its outcome and summary (downtime, bytes per
phase). Finished records are appended to one JSON-lines file under the host's state
root (``<state root>/migrations.jsonl``), so the history, and the dashboard's chart of
past downtimes, survive a daemon restart. The file is bounded: after
:data:`KEEP_RECORDS` appends it is rewritten with the newest :data:`KEEP_RECORDS`
records (to a temporary file, then renamed), so it never holds twice as many. A line
that does not parse (a torn last write) is skipped with a warning.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path
from typing import Any

from ferry.daemon.models import Migration, OpState

log = logging.getLogger(__name__)

KEEP_RECORDS = 500
MAX_LINE_BYTES = 256 * 1024
"""A record's summary is bounded (:mod:`ferry.live.summary`); longer lines are not ours."""


class MigrationHistory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: collections.OrderedDict[str, Migration] = collections.OrderedDict()
        self._appended = 0
        for record in self._load():
            self._records[record.id] = record

    def _load(self) -> list[Migration]:
        try:
            with open(self.path, "rb") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read the migration history %s: %s", self.path, exc)
            return []
        out = []
        for n, line in enumerate(lines[-KEEP_RECORDS:], 1):
            if len(line) > MAX_LINE_BYTES:
                log.warning("%s: record %d is too long; skipped", self.path, n)
                continue
            try:
                out.append(Migration.model_validate_json(line))
            except ValueError:
                log.warning("%s: record %d does not parse; skipped", self.path, n)
        return out

    def start(self, op_id: str, vm_id: str, to: str) -> Migration:
        record = Migration(id=f"mig-{time.time_ns() // 1_000_000:x}-{os.urandom(2).hex()}",
                           operation=op_id, vm_id=vm_id, to=to, state=OpState.RUNNING,
                           started=time.time())
        self._records[record.id] = record
        return record

    def progress(self, mig_id: str, progress: dict[str, Any]) -> None:
        record = self._records.get(mig_id)
        if record is not None and record.state is OpState.RUNNING:
            self._records[mig_id] = record.model_copy(update={"progress": progress})

    def finish(self, mig_id: str, state: OpState, *, summary: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:
        """Record the outcome and append it to the file (a failed write is logged: the
        migration's own outcome does not depend on its history)."""
        record = self._records.get(mig_id)
        if record is None or record.state is not OpState.RUNNING:
            return
        record = record.model_copy(update={"state": state, "finished": time.time(),
                                           "summary": summary, "error": error,
                                           "progress": None})
        self._records[mig_id] = record
        while len(self._records) > KEEP_RECORDS:
            self._records.popitem(last=False)
        try:
            self._append(record)
        except OSError as exc:
            log.warning("cannot write the migration history %s: %s", self.path, exc)

    def _append(self, record: Migration) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(record.model_dump_json() + "\n")
        self._appended += 1
        if self._appended >= KEEP_RECORDS:  # bound the file: keep the newest records
            finished = [r for r in self._records.values() if r.state is not OpState.RUNNING]
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(r.model_dump_json() + "\n" for r in finished[-KEEP_RECORDS:])
            os.replace(tmp, self.path)
            self._appended = 0

    def get(self, mig_id: str) -> Migration | None:
        return self._records.get(mig_id)

    def all(self) -> list[Migration]:
        """Oldest first."""
        return list(self._records.values())
