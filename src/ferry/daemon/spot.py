"""The daemon's spot watch (``ferry daemon --spot-watch PROVIDER``, docs/spot.md).

A :class:`~ferry.spot.SpotWatcher` runs in the daemon's task group. Each notice becomes a
``spot.notice`` event on ``/v1/events`` and counts in ``ferry_spot_notices_total``;
failed looks at the metadata service count in ``ferry_spot_watch_errors_total``. Then
:attr:`SpotWatch.evacuate` runs: **the one hook** where evacuating this node is wired in
(the cluster's drain). Once it has returned, the notice is acknowledged (Azure's
StartRequests: the provider may act at once). Without a hook the notice is only reported.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ferry.daemon.operations import Events
from ferry.errors import FerryError
from ferry.spot import METADATA_URL, Notice, SpotError, SpotWatcher, watcher_for

log = logging.getLogger(__name__)

Evacuate = Callable[[Notice], Awaitable[None]]
"""Move every VM off this node before ``notice.deadline`` (returns once they are out)."""


class SpotMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notices = Counter("ferry_spot_notices", "Spot or preemption notices received, by "
                               "provider and action", ["provider", "action"], registry=registry)
        self.errors = Counter("ferry_spot_watch_errors", "Failed looks at the metadata service "
                              "(no answer, or one refused), by provider and error",
                              ["provider", "error"], registry=registry)
        self.deadline = Gauge("ferry_spot_notice_deadline_seconds", "Unix time of the earliest "
                              "notice's deadline (0: no notice)", registry=registry)


class SpotWatch:
    """One provider's watch inside the daemon; :attr:`evacuate` is the drain's hook."""

    def __init__(self, provider: str, events: Events, registry: CollectorRegistry, *,
                 base_url: str = METADATA_URL, evacuate: Evacuate | None = None) -> None:
        self.provider = provider
        self.base_url = base_url
        self.events = events
        self.metrics = SpotMetrics(registry)
        self.evacuate = evacuate
        self.watcher: SpotWatcher | None = None
        self.notices: list[Notice] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def status(self) -> dict[str, Any]:
        w = self.watcher
        return {"provider": w.provider.value if w else self.provider,
                "requests": w.stats.requests if w else 0, "errors": w.stats.errors if w else 0,
                "last_error": w.stats.last_error if w else None,
                "notices": [n.to_json() for n in self.notices]}

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Watch until cancelled (``auto`` retried until a provider answers)."""
        while self.watcher is None:
            try:
                self.watcher = await watcher_for(self.provider, base_url=self.base_url)
            except SpotError as exc:
                self._error(exc)
                await asyncio.sleep(5.0)
        self.events.publish("spot.watching", provider=self.watcher.provider.value)
        await self.watcher.run(lambda n: self._notice(n, tg), self._error)

    def _error(self, exc: SpotError) -> None:
        self.metrics.errors.labels(exc.provider or self.provider, type(exc).__name__).inc()

    def _notice(self, notice: Notice, tg: asyncio.TaskGroup) -> None:
        log.warning("spot notice from %s: %s at %s (%.0f s left; event %s)", notice.provider,
                    notice.action, notice.deadline.isoformat(), notice.seconds_left(),
                    notice.key)
        self.notices.append(notice)
        self.metrics.notices.labels(notice.provider.value, notice.action.value).inc()
        self.metrics.deadline.set(min(n.deadline for n in self.notices).timestamp())
        self.events.publish("spot.notice", notice=notice.to_json())
        task = tg.create_task(self._handle(notice), name=f"spot notice {notice.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, notice: Notice) -> None:
        if self.evacuate is None:
            log.warning("spot notice %s: no evacuation is wired in; the VMs stay here",
                        notice.key)
            return
        started = dt.datetime.now(dt.UTC)
        try:
            await self.evacuate(notice)  # THE hook: the cluster's drain of this node
        except Exception as exc:  # a failed drain must not take the daemon and its API down
            if isinstance(exc, FerryError):
                log.error("spot notice %s: evacuation failed: %s", notice.key, exc)
            else:
                log.exception("spot notice %s: evacuation failed", notice.key)
            self.events.publish("spot.evacuation", key=notice.key, state="failed",
                                error=str(exc) or type(exc).__name__)
            return
        self.events.publish("spot.evacuation", key=notice.key, state="completed",
                            seconds=(dt.datetime.now(dt.UTC) - started).total_seconds())
        if self.watcher is not None:
            try:
                await self.watcher.acknowledge(notice)
            except SpotError as exc:
                self._error(exc)
