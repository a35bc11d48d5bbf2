"""How a VM ends (its own module: the control protocol's clients need it without the
runner and everything the runner imports)."""

from __future__ import annotations

import enum


class StopMode(enum.Enum):
    """How a VM ends: its overlays deleted, or kept with its device state."""

    DISCARD = "discard"
    SUSPEND = "suspend"
