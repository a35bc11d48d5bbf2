"""Progress reports for long package operations (a 1 GiB memory file takes seconds)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class Phase(enum.Enum):
    HASHING = "hashing"
    """write: first pass, SHA-256 of every source file for the signed header."""
    WRITING = "writing"
    """write: second pass, compressing into the package."""
    VERIFYING = "verifying"
    EXTRACTING = "extracting"


@dataclass(frozen=True, slots=True)
class Progress:
    """Bytes of content done so far in this phase, out of the phase's total."""

    phase: Phase
    path: str
    done_bytes: int
    total_bytes: int


ProgressCallback = Callable[[Progress], None]
