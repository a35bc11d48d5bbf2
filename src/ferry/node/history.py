"""This host's migration history: one record per outgoing migration, kept on disk.

The VM's holder, which runs every migration whoever asked for it (``ferry vm migrate``,
the daemon's API), appends the record when the migration ends: where to, when, the
outcome, and the summary (downtime, bytes per phase) or the error. The file is
``<state root>/migrations.jsonl``, one JSON object per line:

* appends and compaction take an exclusive ``flock`` on the file: holders, the CLI and
  the daemon are separate processes;
* it is bounded: once it holds :data:`COMPACT_AT` lines it is rewritten (to a temporary
  file, then renamed) with the newest :data:`KEEP_RECORDS`;
* reading checks every record (:meth:`MigrationRecord.from_json`) and skips a line that
  does not parse or is too long (a torn last write, or not ours) with a warning, so one
  bad line costs that line only.

``ferry vm migrations`` and the daemon's ``/v1/migrations`` read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from ferry.live import checks

log = logging.getLogger(__name__)

FILE_NAME = "migrations.jsonl"
KEEP_RECORDS = 500
COMPACT_AT = 2 * KEEP_RECORDS
MAX_LINE_BYTES = 256 * 1024
"""A record's summary is bounded (:mod:`ferry.live.summary`); a longer line is not ours."""
ID_PATTERN = re.compile(r"^mig-[0-9a-f]{6,24}$")
STATES = ("succeeded", "failed", "cancelled", "running")


def new_id() -> str:
    """A migration id: time-ordered, unique across processes."""
    return f"mig-{time.time_ns() // 1_000_000:x}{os.urandom(3).hex()}"


def check_id(text: str) -> str:
    if not ID_PATTERN.match(text):
        raise ValueError(f"bad migration id {text!r:.40}")
    return text


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    id: str
    vm_id: str
    to: str
    """``HOST:PORT``, or ``package:FILE`` for an export."""
    state: str
    started: float
    """Unix time."""
    finished: float | None = None
    summary: dict[str, Any] | None = None
    """A live migration's summary (``ferry vm migrate --json``); an export's figures."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> MigrationRecord:
        """A record from the file, every field checked (ValueError names the first bad one)."""
        if not isinstance(data, dict):
            raise ValueError("a record is a JSON object")
        state = checks.text(data.get("state"), "state")
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}")
        summary = data.get("summary")
        if summary is not None and not isinstance(summary, dict):
            raise ValueError("summary must be an object")
        finished = data.get("finished")
        error = data.get("error")
        return cls(id=check_id(checks.text(data.get("id"), "id")),
                   vm_id=checks.text(data.get("vm_id"), "vm_id"),
                   to=checks.text(data.get("to"), "to"), state=state,
                   started=checks.finite(data.get("started"), "started"),
                   finished=None if finished is None else checks.finite(finished, "finished"),
                   summary=summary,
                   error=None if error is None else checks.text(error, "error"))


class MigrationHistory:
    """The file of one host (``<state root>/migrations.jsonl``)."""

    def __init__(self, state_root: Path) -> None:
        self.path = state_root / FILE_NAME

    def append(self, record: MigrationRecord) -> None:
        """Add a finished record (compacting the file when it is long). A failure to write
        is logged, not raised: a migration's outcome does not depend on its history."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                with open(self.path, "a+", encoding="utf-8") as f, _locked(f):
                    try:
                        current = os.stat(self.path).st_ino
                    except FileNotFoundError:
                        current = -1
                    if current != os.fstat(f.fileno()).st_ino:
                        continue  # compacted (replaced) while we waited: open the new file
                    f.write(json.dumps(record.to_json()) + "\n")
                    f.flush()
                    f.seek(0)
                    lines = f.readlines()
                    if len(lines) >= COMPACT_AT:
                        self._compact(lines[-KEEP_RECORDS:])
                    return
        except OSError as exc:
            log.warning("cannot write the migration history %s: %s", self.path, exc)

    def _compact(self, keep: list[str]) -> None:
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.writelines(keep)
        os.replace(tmp, self.path)  # under the old file's lock: appenders wait for it

    def records(self) -> list[MigrationRecord]:
        """Every readable record, oldest first."""
        try:
            with open(self.path, "rb") as f:
                raw = f.readlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read the migration history %s: %s", self.path, exc)
            return []
        out = []
        for n, line in enumerate(raw[-COMPACT_AT:], 1):
            if len(line) > MAX_LINE_BYTES:
                log.warning("%s: line %d is too long; skipped", self.path, n)
                continue
            try:
                out.append(MigrationRecord.from_json(json.loads(line)))
            except ValueError:  # JSONDecodeError is a ValueError
                log.warning("%s: line %d is not a migration record; skipped", self.path, n)
        return out

    def find(self, mig_id: str) -> MigrationRecord | None:
        return next((r for r in reversed(self.records()) if r.id == mig_id), None)


@contextlib.contextmanager
def _locked(f: IO[str]) -> Iterator[None]:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
