"""The daemon's view of this host's migrations (``/v1/migrations``).

Finished migrations come from the host's history file, which the VM holders write
whoever started the migration (:mod:`ferry.node.history`; ``ferry vm migrate`` too), so
the history survives daemon restarts. Migrations this daemon is running are kept here,
with their live progress, until the holder's record lands; for those it started, the
record also names its operation (while the daemon remembers it).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from ferry.daemon.models import Migration, OpState
from ferry.node.history import MigrationHistory, MigrationRecord, new_id

KEEP_OPERATIONS = 500


class DaemonMigrations:
    def __init__(self, state_root: Path) -> None:
        self.history = MigrationHistory(state_root)
        self._running: dict[str, Migration] = {}
        self._operations: collections.OrderedDict[str, str] = collections.OrderedDict()

    def start(self, op_id: str, vm_id: str, to: str) -> str:
        """A migration the daemon is about to ask a holder for: its id (passed in the
        request, so the holder's record has it)."""
        mig_id = new_id()
        self._running[mig_id] = Migration(id=mig_id, operation=op_id, vm_id=vm_id, to=to,
                                          state=OpState.RUNNING, started=time.time())
        self._operations[mig_id] = op_id
        while len(self._operations) > KEEP_OPERATIONS:
            self._operations.popitem(last=False)
        return mig_id

    def progress(self, mig_id: str, progress: dict[str, Any]) -> None:
        record = self._running.get(mig_id)
        if record is not None:
            self._running[mig_id] = record.model_copy(update={"progress": progress})

    def finish(self, mig_id: str) -> None:
        """The holder answered: its record is in the file now (or it could not write it)."""
        self._running.pop(mig_id, None)

    def running(self) -> list[Migration]:
        return list(self._running.values())

    def all(self) -> list[Migration]:
        """Oldest first: the file's records, then the running ones. Blocking (reads the
        file): call it in a thread."""
        done = [self._view(r) for r in self.history.records()]
        known = {r.id for r in done}
        return done + [r for r in self._running.values() if r.id not in known]

    def get(self, mig_id: str) -> Migration | None:
        if mig_id in self._running:
            return self._running[mig_id]
        found = self.history.find(mig_id)
        return None if found is None else self._view(found)

    def _view(self, r: MigrationRecord) -> Migration:
        return Migration(id=r.id, operation=self._operations.get(r.id), vm_id=r.vm_id,
                         to=r.to, state=OpState(r.state), started=r.started,
                         finished=r.finished, summary=r.summary, error=r.error)
