"""Lifecycle of a migration, on either side."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    IDLE = "idle"
    PRECOPY = "precopy"
    DIRTY_CYCLES = "dirty-cycles"
    STOP_AND_COPY = "stop-and-copy"
    POSTCOPY = "postcopy"
    COMPLETED = "completed"
    FAILED = "failed"
