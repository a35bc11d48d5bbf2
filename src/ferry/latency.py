"""Latencies as a fixed-bucket histogram plus exact quantiles of the first samples.

:class:`LatencyRecorder` is what a post-copy destination keeps of the reads that had
to wait for a block still in flight (the guest's "faults"): the count, the sum and
the maximum of every sample, a count per bucket of :data:`BUCKETS_MS` (Prometheus'
cumulative ``le`` buckets are built from these), and the first :data:`KEEP_SAMPLES`
samples themselves for exact quantiles (a migration's post-copy has at most one wait
per block per absence, so this holds all of them for guests up to 1 GiB in 64 KiB
blocks). Memory is bounded whatever a peer makes us wait for.
"""

from __future__ import annotations

import bisect
from typing import Any

BUCKETS_MS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
              2000.0, 5000.0)
"""Upper bounds; one more bucket (+Inf) counts the rest."""
KEEP_SAMPLES = 16384


class LatencyRecorder:
    def __init__(self) -> None:
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0
        self.buckets = [0] * (len(BUCKETS_MS) + 1)
        self._samples: list[float] = []

    def observe(self, seconds: float) -> None:
        ms = max(0.0, seconds * 1e3)
        self.count += 1
        self.sum_ms += ms
        self.max_ms = max(self.max_ms, ms)
        self.buckets[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        if len(self._samples) < KEEP_SAMPLES:
            self._samples.append(ms)

    def merge(self, other: LatencyRecorder) -> None:
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        room = KEEP_SAMPLES - len(self._samples)
        self._samples.extend(other._samples[:max(0, room)])

    def quantile_ms(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the samples kept; None without samples."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    def figures(self) -> dict[str, Any]:
        """``faults``, ``fault_wait_ms_p50``/``_p90``/``_max`` and ``fault_wait_buckets``
        (:data:`BUCKETS_MS` and +Inf), as the destination's report carries them."""
        return {"faults": self.count,
                "fault_wait_ms_p50": _round(self.quantile_ms(0.5)),
                "fault_wait_ms_p90": _round(self.quantile_ms(0.9)),
                "fault_wait_ms_max": _round(self.max_ms) if self.count else None,
                "fault_wait_ms_sum": round(self.sum_ms, 3),
                "fault_wait_buckets": list(self.buckets)}


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)
