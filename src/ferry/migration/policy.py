"""When a migration stops copying dirty blocks and suspends the source.

The defaults follow Silo's: the source keeps re-sending dirty blocks while the
guest runs and suspends once the dirty set has been small (<= 200 blocks,
12.5 MiB at 64 KiB) for 5 scans in a row, or after 20 scans whatever happens,
waiting 500 ms between scans so a scan sees a meaningful amount of change.

ferry adds one rule: when the dirty set stops shrinking (no scan in the last
``max_cycles_without_progress`` found 10% fewer dirty blocks than the best scan
so far), more cycles only resend the same hot blocks, so the source suspends
and leaves the rest to the final dirty list (hybrid mode: post-copy).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ferry.errors import ConfigError


class Mode(enum.Enum):
    """How the destination takes over.

    HYBRID: hand the authority over right after the final dirty list; blocks the
    destination still lacks are streamed afterwards and fetched on demand.
    PRECOPY_ONLY: send every remaining block before the hand-off, so the
    destination never depends on the source after it starts (longer downtime,
    no post-copy risk).
    POSTCOPY: no pre-copy at all: suspend and hand over at once, then stream
    every block while the destination fetches what it touches first. For
    sources that do not run (a package served by a registry): the destination
    starts as soon as the device state arrives.
    """

    HYBRID = "hybrid"
    PRECOPY_ONLY = "precopy-only"
    POSTCOPY = "postcopy"


@dataclass(frozen=True, slots=True)
class DirtyPolicy:
    max_dirty_blocks: int = 200
    min_cycles_below: int = 5
    max_cycles: int = 20
    cycle_throttle_s: float = 0.5
    max_cycles_without_progress: int = 5  # 0: never give up before max_cycles

    def __post_init__(self) -> None:
        counts = (
            self.max_dirty_blocks,
            self.min_cycles_below,
            self.max_cycles,
            self.max_cycles_without_progress,
        )
        if min(counts) < 0:
            raise ConfigError("dirty policy counts must be >= 0")
        if self.cycle_throttle_s < 0:
            raise ConfigError("cycle_throttle_s must be >= 0")

    def converged(self, *, cycles: int, cycles_below: int, cycles_stalled: int = 0) -> bool:
        """True once it is time to suspend.

        ``cycles`` is the number of dirty scans done; ``cycles_below`` how many
        of the latest scans in a row found at most ``max_dirty_blocks``;
        ``cycles_stalled`` how many scans in a row made no progress.
        """
        stalled = 0 < self.max_cycles_without_progress <= cycles_stalled
        return cycles >= self.max_cycles or cycles_below >= self.min_cycles_below or stalled
