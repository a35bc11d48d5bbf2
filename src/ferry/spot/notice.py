"""What a watcher hands on: one :class:`Notice` per provider event.

A notice says which provider, what it will do (:class:`Action`), by when (an absolute,
timezone-aware UTC ``deadline``), and carries the provider's own words (``details``, the
parsed response) for the record. ``key`` identifies the event: a watcher hands on a
given key at most once.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.errors import ConfigError


class Provider(enum.StrEnum):
    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"


class Action(enum.StrEnum):
    """What the provider will do to this machine at the deadline."""

    TERMINATE = "terminate"  # AWS terminate; Azure Terminate (scale-set delete)
    STOP = "stop"  # AWS stop
    HIBERNATE = "hibernate"  # AWS hibernate (RAM to the root volume, then stop)
    PREEMPT = "preempt"  # GCP preempted; Azure Preempt (spot eviction)


WINDOW_S: Mapping[Provider, float] = {
    Provider.AWS: 120.0,  # the instance-action item appears two minutes ahead
    Provider.GCP: 30.0,  # preempted turns TRUE about 30 s before ACPI soft-off
    Provider.AZURE: 30.0,  # a Preempt event's NotBefore is at least 30 s ahead
}
"""Each provider's documented notice window: what a notice should leave, not a promise."""


@dataclass(frozen=True, slots=True)
class Notice:
    """One provider event announcing that this machine goes away."""

    provider: Provider
    action: Action
    deadline: dt.datetime
    """When the provider acts (UTC, timezone-aware). GCP gives no time: the moment the
    watcher saw ``preempted`` turn ``TRUE`` plus :data:`WINDOW_S`."""
    observed: dt.datetime
    """When the watcher saw it (UTC, timezone-aware)."""
    key: str
    """The event's identity: AWS ``action@time``, GCP ``preempted``, Azure ``EventId``."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """The provider's response, parsed (AWS's JSON, GCP's value and ETag, Azure's event)."""

    def __post_init__(self) -> None:
        for name in ("deadline", "observed"):
            when: dt.datetime = getattr(self, name)
            if when.tzinfo is None:
                raise ConfigError(f"notice {name} must be timezone-aware: {when!r}")
        if not self.key:
            raise ConfigError("a notice needs a key")

    @property
    def window_s(self) -> float:
        """Seconds from seeing the notice to its deadline."""
        return (self.deadline - self.observed).total_seconds()

    def seconds_left(self, now: dt.datetime | None = None) -> float:
        """Seconds until the deadline (negative once it has passed)."""
        now = now or dt.datetime.now(dt.UTC)
        return (self.deadline - now).total_seconds()

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider.value, "action": self.action.value,
                "deadline": self.deadline.isoformat(), "observed": self.observed.isoformat(),
                "window_s": round(self.window_s, 3), "key": self.key,
                "details": dict(self.details)}
