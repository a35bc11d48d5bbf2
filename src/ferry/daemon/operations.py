"""Long operations (run a package, migrate a VM) as resources: polled, cancelled, announced.

``POST /v1/vms`` and ``POST /v1/vms/{id}/migrate`` answer ``202`` with an
:class:`~ferry.daemon.models.Operation` at once; the work runs in the daemon's
task group, not in the request, so a client that disconnects leaves no
half-done work behind: the operation finishes (or fails cleanly) on its own.
Finished operations are kept (the newest :data:`KEEP_FINISHED`) until the
daemon restarts. Every state change is also an event (:class:`Events`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.daemon.models import Operation, OpState
from ferry.daemon.problems import for_error
from ferry.errors import FerryError

log = logging.getLogger(__name__)

KEEP_FINISHED = 256
SUBSCRIBER_QUEUE = 256
"""Events one slow subscriber may lag behind before it is dropped (it reconnects)."""

Work = Callable[[str], Awaitable[dict[str, Any]]]
"""The operation's work, given its id (to :meth:`Operations.report` progress)."""
Cancel = Callable[[], Awaitable[None]]


class Events:
    """Fan-out of JSON events to subscribers (``/v1/events``); bounded per subscriber."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._seq = itertools.count(1)

    def publish(self, kind: str, **data: Any) -> None:
        event = {"seq": next(self._seq), "time": time.time(), "kind": kind, **data}
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # too slow: end its stream, it can reconnect
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any] | None]]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()


@dataclass
class _Op:
    id: str
    kind: str
    vm_id: str | None
    created: float
    state: OpState = OpState.RUNNING
    finished: float | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    cancel: Cancel | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self) -> Operation:
        return Operation(id=self.id, kind=self.kind, vm_id=self.vm_id, state=self.state,
                         created=self.created, finished=self.finished, progress=self.progress,
                         result=self.result, error=self.error)


class Operations:
    """The daemon's operations; ``tg`` (the daemon's task group) owns their tasks."""

    def __init__(self, tg: asyncio.TaskGroup, events: Events, *,
                 on_finish: Callable[[Operation], None] = lambda op: None) -> None:
        self._tg = tg
        self._events = events
        self._on_finish = on_finish
        self._ops: dict[str, _Op] = {}
        self._ids = itertools.count(1)
        self._finished: collections.deque[str] = collections.deque()

    def start(self, kind: str, vm_id: str | None, work: Work, *,
              cancel: Cancel | None = None) -> Operation:
        op = _Op(f"op-{next(self._ids)}", kind, vm_id, time.time(), cancel=cancel)
        self._ops[op.id] = op
        op.task = self._tg.create_task(self._run(op, work), name=f"{op.id} {kind}")
        self._announce(op)
        return op.view()

    async def _run(self, op: _Op, work: Work) -> None:
        try:
            op.result = await work(op.id)
            op.state = OpState.SUCCEEDED
        except asyncio.CancelledError:
            op.state = OpState.CANCELLED
        except FerryError as exc:
            p = for_error(exc)
            op.error = {"type": p.slug, "title": p.title, "status": p.status,
                        "detail": p.detail, **p.extra}
            op.state = OpState.FAILED
        except Exception as exc:  # a bug: the operation fails, the daemon goes on
            log.exception("operation %s (%s) failed", op.id, op.kind)
            op.error = {"type": "internal", "title": "Internal error", "status": 500,
                        "detail": f"{type(exc).__name__} (logged by the daemon)"}
            op.state = OpState.FAILED
        op.finished = time.time()
        op.done.set()
        self._announce(op)
        self._on_finish(op.view())
        self._finished.append(op.id)
        while len(self._finished) > KEEP_FINISHED:
            self._ops.pop(self._finished.popleft(), None)

    def _announce(self, op: _Op) -> None:
        self._events.publish("operation", operation=op.view().model_dump(mode="json"))

    def report(self, op_id: str, progress: dict[str, Any]) -> None:
        """A running operation's progress changed: keep it and announce it."""
        op = self._ops.get(op_id)
        if op is not None and op.state is OpState.RUNNING and progress != op.progress:
            op.progress = progress
            self._announce(op)

    def get(self, op_id: str) -> Operation | None:
        op = self._ops.get(op_id)
        return None if op is None else op.view()

    def all(self) -> list[Operation]:
        return [op.view() for op in self._ops.values()]

    async def wait(self, op_id: str, timeout_s: float) -> Operation | None:
        """The operation once finished, or as it is after ``timeout_s``."""
        op = self._ops.get(op_id)
        if op is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await op.done.wait()
        return op.view()

    async def cancel(self, op_id: str) -> Operation | None:
        """Ask the operation to stop (its own cancel hook if it has one, e.g. a
        migration's ``migrate-cancel``, which keeps a VM already handed off where it
        runs); returns it as it is then."""
        op = self._ops.get(op_id)
        if op is None:
            return None
        if op.state is OpState.RUNNING:
            if op.cancel is not None:
                await op.cancel()
            elif op.task is not None:
                op.task.cancel()
        return op.view()
