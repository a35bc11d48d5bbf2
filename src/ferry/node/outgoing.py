"""The ``migrate`` and ``migrate-cancel`` ops of a process holding one VM.

One migration at a time. Before the hand-off a cancel (Ctrl-C on ``ferry vm
migrate``) or any failure resumes the VM here; after it the VM belongs to the
destination and a cancel is refused. Once the VM left (migrated, or exported
into a package) :attr:`Outgoing.gone` is set and the holder stops holding it.
The moving itself is :func:`ferry.live.outgoing.migrate_to_host` and
:func:`~ferry.live.outgoing.export_to_package`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from ferry.errors import FerryError
from ferry.live.access import Access
from ferry.live.errors import LiveMigrationError
from ferry.live.outgoing import Movable, Moved, export_to_package, migrate_to_host, options_for
from ferry.live.progress import MigrationProgress
from ferry.live.source import LiveOptions
from ferry.node.control import (
    ExportReply,
    MigrateCancelReply,
    MigrateCancelRequest,
    MigrateReply,
    MigrateRequest,
)
from ferry.node.history import MigrationHistory, MigrationRecord, new_id


class MigrateFn(Protocol):
    def __call__(self, m: Movable, host: str, port: int, *, access: Access,
                 options: LiveOptions,
                 on_handed_off: Callable[[], Awaitable[None]] | None,
                 progress: MigrationProgress | None) -> Awaitable[Moved]:
        ...


class ExportFn(Protocol):
    def __call__(self, m: Movable, file: Path, *, key: Path | None,
                 overwrite: bool) -> Awaitable[dict[str, Any]]:
        ...


class Outgoing:
    """Runs one migration of the VM ``get_movable`` returns (None: not running yet)."""

    def __init__(self, get_movable: Callable[[], Movable | None], *,
                 migrate: MigrateFn = migrate_to_host, export: ExportFn = export_to_package,
                 on_active: Callable[[bool], None] = lambda active: None,
                 history: MigrationHistory | None = None) -> None:
        self._get = get_movable
        self._history = history
        self._migrate = migrate
        self._export = export
        self._on_active = on_active
        self._task: asyncio.Task[MigrateReply | ExportReply] | None = None
        self._handed_off = False
        self._timed_out = False
        self.idle = asyncio.Event()
        """Set while no migration runs."""
        self.idle.set()
        self.gone = False
        """The VM left this process (migrated or exported): stop holding it."""
        self._progress: MigrationProgress | None = None

    @property
    def active(self) -> bool:
        """A migration is running (the VM's QEMU may stop without that being a crash)."""
        return self._task is not None and not self._task.done()

    def progress(self) -> dict[str, Any] | None:
        """How far the running live migration is (None: none runs, or an export)."""
        if not self.active or self._progress is None:
            return None
        return self._progress.snapshot()

    def cancel(self, _: MigrateCancelRequest | None = None) -> MigrateCancelReply:
        if not self.active:
            return MigrateCancelReply(False, "no migration running")
        if self._handed_off:
            return MigrateCancelReply(False, "already handed off: post-copy must finish")
        assert self._task is not None
        self._task.cancel()
        return MigrateCancelReply(True)

    async def migrate(self, req: MigrateRequest) -> MigrateReply | ExportReply:
        """Run ``req`` to its end; :class:`LiveMigrationError` (with ``handed_off``) if it
        failed or was cancelled."""
        m = self._get()
        if m is None:
            raise LiveMigrationError("the VM is not running", vm=None, handed_off=False)
        if self.active or self.gone:
            raise LiveMigrationError("a migration is already running or done", vm=m.vm_id,
                                     handed_off=False)
        self._handed_off = False
        self._timed_out = False
        self.idle.clear()
        self._on_active(True)
        started = time.time()
        self._task = asyncio.create_task(self._run(m, req), name=f"migrate {m.vm_id}")
        self._task.add_done_callback(self._finished)
        watchdog = None
        if req.timeout_s is not None:
            watchdog = asyncio.get_running_loop().call_later(req.timeout_s, self._time_out)
        try:
            result = await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled():
                if self._timed_out:
                    text = f"timed out after {req.timeout_s:g} s before the hand-off"
                    self._record(m, req, started, "failed", error=text)
                else:
                    text = "migration cancelled before the hand-off"
                    self._record(m, req, started, "cancelled",
                                 error="cancelled before the hand-off")
                raise LiveMigrationError(text, vm=m.vm_id, handed_off=False) from None
            raise
        except FerryError as exc:
            self._record(m, req, started, "failed", error=str(exc))
            if isinstance(exc, LiveMigrationError) and exc.handed_off:
                self.gone = True
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
        self.gone = True
        if isinstance(result, ExportReply):
            self._record(m, req, started, "succeeded", summary={
                "package": result.package, "key_id": result.key_id,
                "state_bytes": result.state_bytes, "paused_s": result.paused_s,
                "total_s": result.total_s})
        else:
            self._record(m, req, started,
                         "succeeded" if result.summary.handed_off else "failed",
                         summary=result.summary.to_json())
        return result

    def _record(self, m: Movable, req: MigrateRequest, started: float, state: str, *,
                summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        if self._history is None:
            return
        to = f"{req.to[0]}:{req.to[1]}" if req.to is not None else f"package:{req.package}"
        self._history.append(MigrationRecord(
            id=req.migration_id or new_id(), vm_id=m.vm_id, to=to, state=state,
            started=started, finished=time.time(), summary=summary, error=error))

    def _time_out(self) -> None:
        """``timeout_s`` passed: cancel unless the VM was handed off (then post-copy must
        finish wherever it is)."""
        if self.active and not self._handed_off:
            self._timed_out = True
            assert self._task is not None
            self._task.cancel()

    def _finished(self, _: asyncio.Task[MigrateReply | ExportReply]) -> None:
        self.idle.set()
        self._on_active(False)

    async def _run(self, m: Movable, req: MigrateRequest) -> MigrateReply | ExportReply:
        self._progress = None
        if req.package is not None:
            done = await self._export(m, req.package, key=req.key, overwrite=req.overwrite)
            return ExportReply(str(done["package"]), str(done["key_id"]),
                               int(done["state_bytes"]), float(done["paused_s"]),
                               float(done["total_s"]), str(done["name"]))
        assert req.to is not None
        assert req.access is not None

        async def handed_off() -> None:
            self._handed_off = True

        host, port = req.to
        self._progress = MigrationProgress()
        moved = await self._migrate(m, host, port, access=req.access,
                                    options=options_for(req.precopy_only, req.ram,
                                                        req.max_mbit, req.compression),
                                    on_handed_off=handed_off, progress=self._progress)
        return MigrateReply(moved.summary, moved.source, moved.destination)
