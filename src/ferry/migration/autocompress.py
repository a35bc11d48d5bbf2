"""Whether to compress what goes on the link: from its measured speed and the data's
measured compressibility.

Compression pays when the link is slower than the CPU can shrink data: the stream
goes at ``L`` bytes/s plain on a link carrying ``L`` bytes/s, and at
``min(c, L / r)`` compressed (``c``: compression speed, ``r``: compressed size over
size), since senders compress the next chunk while the last one is on the link. So
compressing is faster when ``min(c, L / r) > L``: on a 1 Gbit/s link and guest RAM
that zstd-1 takes to a fifth at 230 MB/s, about twice as fast; on loopback, slower.

:class:`AutoCompression` measures all three while the stream flows, in windows of
:data:`WINDOW_S`:

* ``L`` is the *goodput* of plain windows (bytes of stream per second of sending).
* ``r`` and ``c`` come from every chunk compressed; in plain windows one chunk in
  :data:`SAMPLE_EVERY` has a slice of :data:`SAMPLE_BYTES` compressed as a sample
  (at most a few per cent of a window's CPU time, even on loopback).
* After each window the next window's mode is chosen: compressed when the model above
  predicts a goodput at least :data:`GAIN` times ``L``, and the last compressed
  window measured one (a wrong model is caught by the measurement: a CPU busier than
  the samples said, a link faster than it looked).
* While compressing, one window in :data:`EXPLORE_EVERY` goes plain to measure ``L``
  again: links and compressibility change during a migration (zero pages, then a
  page cache, then a heap). While plain against the model's advice (a compressed
  window measured worse), the measurement is forgotten after as many windows.

Sans-IO: the caller passes sizes and durations and asks what to do; ``clock`` is
injectable for tests.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 0.15
SAMPLE_EVERY = 16
SAMPLE_BYTES = 32 * 1024
EXPLORE_EVERY = 8
GAIN = 1.1
_EWMA = 0.5


class LinkCompression(enum.Enum):
    """``--compression``: what a migration compresses on its link."""

    AUTO = "auto"
    """Compress while it makes the link carry more (see the module docstring)."""
    NONE = "none"
    ZSTD = "zstd"


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA * (new - old)


@dataclass(slots=True)
class CompressionStats:
    """What was chosen, for the migration report."""

    chunks: int = 0
    chunks_compressed: int = 0
    bytes_in: int = 0
    wire_bytes: int = 0
    windows_plain: int = 0
    windows_compressed: int = 0
    link_bytes_s: float | None = None
    ratio: float | None = None
    compress_bytes_s: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "chunks": self.chunks, "chunks_compressed": self.chunks_compressed,
            "bytes_in": self.bytes_in, "wire_bytes": self.wire_bytes,
            "windows_plain": self.windows_plain,
            "windows_compressed": self.windows_compressed,
            "link_mib_s": None if self.link_bytes_s is None
            else round(self.link_bytes_s / 2**20, 1),
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "compress_mib_s": None if self.compress_bytes_s is None
            else round(self.compress_bytes_s / 2**20, 1),
        }


class AutoCompression:
    """Chooses, chunk by chunk, between plain and compressed (see the module docstring)."""

    def __init__(self, mode: LinkCompression = LinkCompression.AUTO, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self._clock = clock
        self._compressing = mode is LinkCompression.ZSTD
        self._window_start: float | None = None
        self._window_bytes = 0
        self._windows_since_explore = 0
        self._chunks_this_window = 0
        self._goodput_compressed: float | None = None
        self.stats = CompressionStats()

    # -- questions -----------------------------------------------------------------

    def compress_next(self) -> bool:
        """Whether to compress the next chunk."""
        return self._compressing

    def sample_next(self) -> bool:
        """Whether to compress a slice of the next (plain) chunk as a sample."""
        return (self.mode is LinkCompression.AUTO and not self._compressing
                and self._chunks_this_window % SAMPLE_EVERY == 0)

    def predicted_compressed_goodput(self) -> float | None:
        """Bytes of stream per second compressed, by the model (compression of one chunk
        overlapping the sending of the last); None before measurements."""
        s = self.stats
        if s.link_bytes_s is None or s.ratio is None or s.compress_bytes_s is None:
            return None
        return min(s.compress_bytes_s, s.link_bytes_s / max(s.ratio, 1e-3))

    # -- observations ------------------------------------------------------------

    def compressed(self, in_bytes: int, out_bytes: int, seconds: float) -> None:
        """A chunk or sample of ``in_bytes`` compressed to ``out_bytes`` in ``seconds``."""
        if in_bytes <= 0:
            return
        s = self.stats
        s.ratio = _ewma(s.ratio, min(out_bytes / in_bytes, 1.0))
        if seconds > 0:
            s.compress_bytes_s = _ewma(s.compress_bytes_s, in_bytes / seconds)

    def sent(self, in_bytes: int, wire_bytes: int, *, compressed: bool) -> None:
        """A chunk of ``in_bytes`` went on the link as ``wire_bytes``."""
        s = self.stats
        s.chunks += 1
        s.chunks_compressed += compressed
        s.bytes_in += in_bytes
        s.wire_bytes += wire_bytes
        self._chunks_this_window += 1
        now = self._clock()
        if self._window_start is None:
            self._window_start = now
            self._window_bytes = in_bytes
            return
        self._window_bytes += in_bytes
        elapsed = now - self._window_start
        if elapsed >= WINDOW_S:
            self._close_window(self._window_bytes / elapsed)
            self._window_start = now
            self._window_bytes = 0
            self._chunks_this_window = 0

    def idle(self) -> None:
        """The stream had nothing to send for a while: the window in progress measured
        the source, not the link, and is dropped."""
        self._window_start = None
        self._window_bytes = 0

    # -- the decision --------------------------------------------------------------

    def _close_window(self, goodput: float) -> None:
        s = self.stats
        if self._compressing:
            s.windows_compressed += 1
            self._goodput_compressed = _ewma(self._goodput_compressed, goodput)
        else:
            s.windows_plain += 1
            s.link_bytes_s = _ewma(s.link_bytes_s, goodput)
        if self.mode is not LinkCompression.AUTO:
            return
        self._windows_since_explore += 1
        if self._windows_since_explore >= EXPLORE_EVERY:
            self._windows_since_explore = 0
            if self._compressing:
                self._compressing = False  # one plain window: measure the link again
                return
            # Plain for a while against the model's advice: the compressed goodput
            # measured long ago is forgotten, so compression gets another try.
            self._goodput_compressed = None
        self._compressing = self._compression_pays()

    def _compression_pays(self) -> bool:
        link = self.stats.link_bytes_s
        predicted = self.predicted_compressed_goodput()
        if link is None or predicted is None or predicted < GAIN * link:
            return False
        measured = self._goodput_compressed
        return measured is None or measured >= GAIN * link
