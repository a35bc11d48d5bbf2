"""When a migration stops copying dirty blocks and suspends the source.

The defaults follow Silo's: the source keeps re-sending dirty blocks while the
guest runs and suspends once the dirty set has been small (<= 200 blocks,
12.5 MiB at 64 KiB) for 5 scans in a row, or after 20 scans whatever happens,
waiting 500 ms between scans so a scan sees a meaningful amount of change.

That alone never converges under a writer that dirties blocks about as fast as
the link sends them: every cycle re-sends the same amount, until the cycle
limit. :class:`Convergence` therefore decides after every scan, on what the
scan found and how fast the sends went, whether another cycle can pay off.
Theory of operation (the rules are tried in this order after each scan):

1. **Nothing dirty** (converged, ``SMALL_DIRTY_SET``): waiting longer gains nothing.
2. **Bytes budget**: re-sending this scan's blocks would take the bytes re-sent
   by dirty cycles past ``max_resend_ratio`` times the group's size. A hard cap
   on traffic: before the suspend at most ``1 + max_resend_ratio`` group sizes
   go out.
3. **Small dirty set** (converged): the last ``min_cycles_below`` scans in a row
   were small (every device at or below its ``max_dirty_blocks``).
4. **Dirty rate exceeds the link**: the next scan is predicted to find
   ``rate x (dirty_bytes / throughput + cycle_throttle_s)`` bytes, the dirty rate
   times the time sending this set and waiting for the next scan take. If that is
   not at least ``MIN_SHRINK`` (10%) smaller than this scan's set, another cycle
   only re-sends what the writer dirties again. QEMU decides the same way (it
   switches over once the bytes dirtied per iteration stop dropping, or the
   remainder fits the downtime at the measured bandwidth; libvirt's
   ``--postcopy-after-precopy`` switches to post-copy after the first pass).
   Small sets are left to rule 3: they are cheap to re-send.
5. **No progress**: no scan in the last ``max_cycles_without_progress`` found
   10% fewer dirty blocks than the best scan so far (a hot set, or noise).
6. **Cycle limit**: ``max_cycles`` scans (0: no scan at all).

Where the stopping scan's blocks go (:attr:`Decision.resend`). A small set is
re-sent as one last cycle and the source suspends right after it (no throttle
wait), as before: it is cheap and leaves fewer blocks for the suspend. A large
one goes with the final dirty list instead (no cycle): in HYBRID mode post-copy
sends it once, which is the point of stopping; in PRECOPY_ONLY mode it is sent
with the source paused, so there it is re-sent first when the link outpaces the
writer (the paused copy is then smaller), unless the bytes budget forbids it.
A PRECOPY_ONLY user who prefers traffic over downtime raises
``max_resend_ratio`` or sets it to 0 (no budget).
"""

from __future__ import annotations

import enum
import math
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


class StopReason(enum.Enum):
    """Why the dirty cycles ended: the report's ``stop_reason``."""

    SMALL_DIRTY_SET = "small-dirty-set"
    """Converged: ``min_cycles_below`` small scans in a row, or a scan found nothing."""
    BYTES_BUDGET = "bytes-budget"
    """Another cycle would re-send more than ``max_resend_ratio`` x the group's size."""
    DIRTY_RATE_EXCEEDS_LINK = "dirty-rate-exceeds-link"
    """The next scan would not find a smaller set: the writer dirties about as fast as
    the link sends (or faster)."""
    NO_PROGRESS = "no-progress"
    """The dirty set stopped shrinking for ``max_cycles_without_progress`` scans."""
    CYCLE_LIMIT = "cycle-limit"
    """``max_cycles`` scans (0: none at all)."""


MIN_SHRINK = 0.1
"""A cycle counts as progress when it leaves at least 10% less to send: the margin of
the no-progress rule and of the prediction, so noise of a few percent is no progress."""


@dataclass(frozen=True, slots=True)
class DirtyPolicy:
    max_dirty_blocks: int = 200
    min_cycles_below: int = 5
    max_cycles: int = 20
    cycle_throttle_s: float = 0.5
    max_cycles_without_progress: int = 5  # 0: never give up before max_cycles
    max_resend_ratio: float = 1.0
    """Bytes re-sent by dirty cycles, at most this many times the group's size (0: no
    budget). 1.0 bounds what goes out before the suspend to twice the group's size."""
    stop_on_dirty_rate: bool = True
    """Stop as soon as the next cycle is predicted not to shrink (rule 4)."""

    def __post_init__(self) -> None:
        counts = (
            self.max_dirty_blocks,
            self.min_cycles_below,
            self.max_cycles,
            self.max_cycles_without_progress,
        )
        if min(counts) < 0:
            raise ConfigError("dirty policy counts must be >= 0")
        if not self.cycle_throttle_s >= 0 or math.isinf(self.cycle_throttle_s):
            raise ConfigError("cycle_throttle_s must be >= 0")
        if not self.max_resend_ratio >= 0 or math.isinf(self.max_resend_ratio):
            raise ConfigError("max_resend_ratio must be a finite number >= 0")

    def count_rule(
        self, *, cycles: int, cycles_below: int, cycles_stalled: int = 0
    ) -> StopReason | None:
        """The rules on counts alone (3, 5, 6): the reason to stop, or None.

        ``cycles`` is the number of dirty scans done; ``cycles_below`` how many
        of the latest scans in a row were small; ``cycles_stalled`` how many
        scans in a row made no progress.
        """
        if cycles_below >= self.min_cycles_below:
            return StopReason.SMALL_DIRTY_SET
        if 0 < self.max_cycles_without_progress <= cycles_stalled:
            return StopReason.NO_PROGRESS
        if cycles >= self.max_cycles:
            return StopReason.CYCLE_LIMIT
        return None

    def converged(self, *, cycles: int, cycles_below: int, cycles_stalled: int = 0) -> bool:
        """True once the count rules say it is time to suspend (see :meth:`count_rule`)."""
        reason = self.count_rule(
            cycles=cycles, cycles_below=cycles_below, cycles_stalled=cycles_stalled
        )
        return reason is not None


@dataclass(frozen=True, slots=True)
class Scan:
    """What one dirty scan found, and how the send before it went.

    ``watched_s``: how long the dirty tracker watched the blocks it found dirty:
    the time since the previous scan, or for the first scan (tracking starts
    when pre-copy reads a block) the mean time since pre-copy read them.
    ``sent_bytes`` / ``send_s``: what the send before this scan (pre-copy, or
    the previous cycle) moved and how long it took, from push to drained.
    """

    dirty_blocks: int
    dirty_bytes: int
    small: bool
    watched_s: float
    sent_bytes: int
    send_s: float

    @property
    def dirty_rate_bytes_s(self) -> float | None:
        """Bytes dirtied per second while watched (None: not measurable)."""
        return self.dirty_bytes / self.watched_s if self.watched_s > 0 else None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a scan.

    ``stop`` None: send the scan's blocks as a dirty cycle and scan again.
    Otherwise suspend now, after re-sending the scan's blocks as one last cycle
    if ``resend``, else with them in the final dirty list.
    """

    stop: StopReason | None = None
    resend: bool = True
    predicted_next_bytes: float | None = None
    """The prediction of rule 4 (None: no throughput or rate measured yet)."""


class Convergence:
    """The stop decision of one migration's dirty cycles: sans-IO, fed one scan at a time.

    The migrator calls :meth:`start` once before the first scan, then
    :meth:`after_scan` after every scan until a decision says stop. Throughput
    is measured over everything sent so far (pre-copy included), so one small
    cycle's timing noise does not swing it.
    """

    def __init__(self, policy: DirtyPolicy, *, mode: Mode, group_bytes: int) -> None:
        self._policy = policy
        self._precopy_only = mode is Mode.PRECOPY_ONLY
        self._group_bytes = group_bytes
        self.scans = 0
        self.resent_bytes = 0
        self._below = 0
        self._stalled = 0
        self._best: int | None = None
        self._sent_bytes = 0
        self._send_s = 0.0

    @property
    def throughput_bytes_s(self) -> float | None:
        return self._sent_bytes / self._send_s if self._send_s > 0 else None

    def start(self) -> Decision:
        """Before any scan: stop at once when the policy allows no cycle at all."""
        reason = self._policy.count_rule(cycles=0, cycles_below=0)
        return Decision(reason) if reason is not None else Decision()

    def after_scan(self, scan: Scan) -> Decision:
        """Account for ``scan`` and decide (the rules in the module docstring)."""
        p = self._policy
        self.scans += 1
        self._sent_bytes += scan.sent_bytes
        self._send_s += scan.send_s
        self._below = self._below + 1 if scan.small else 0
        if self._best is None or scan.dirty_blocks < self._best * (1 - MIN_SHRINK):
            self._best, self._stalled = scan.dirty_blocks, 0
        else:
            self._stalled += 1
        rate = scan.dirty_rate_bytes_s
        link = self.throughput_bytes_s
        predicted = None
        if rate is not None and link is not None:
            predicted = rate * (scan.dirty_bytes / link + p.cycle_throttle_s)

        if scan.dirty_blocks == 0:
            return Decision(StopReason.SMALL_DIRTY_SET, True, predicted)
        budget = p.max_resend_ratio * self._group_bytes
        if p.max_resend_ratio > 0 and self.resent_bytes + scan.dirty_bytes > budget:
            return Decision(StopReason.BYTES_BUDGET, False, predicted)
        reason = p.count_rule(
            cycles=self.scans, cycles_below=self._below, cycles_stalled=self._stalled
        )
        if reason is not StopReason.SMALL_DIRTY_SET and (
            p.stop_on_dirty_rate
            and not scan.small
            and predicted is not None
            and predicted >= (1 - MIN_SHRINK) * scan.dirty_bytes
        ):
            reason = StopReason.DIRTY_RATE_EXCEEDS_LINK
        if reason is None:
            self.resent_bytes += scan.dirty_bytes
            return Decision(None, True, predicted)
        resend = scan.small or (
            self._precopy_only
            and (rate is None or link is None or rate < (1 - MIN_SHRINK) * link)
        )
        if resend:
            self.resent_bytes += scan.dirty_bytes
        return Decision(reason, resend, predicted)
