"""AutoCompression's choice on simulated links: a fake clock advances as a pipelined
sender would spend time (compressing the next chunk while this one is sent)."""

from __future__ import annotations

from ferry.migration.autocompress import (
    EXPLORE_EVERY,
    SAMPLE_BYTES,
    AutoCompression,
    LinkCompression,
)

CHUNK = 256 * 1024


class Sim:
    """A sender over a link of ``link_bytes_s`` with data of ``ratio`` compressed at
    ``compress_bytes_s``; runs ``chunks`` chunks and returns the stream's goodput."""

    def __init__(self, mode: LinkCompression, *, link_bytes_s: float, ratio: float,
                 compress_bytes_s: float = 400e6) -> None:
        self.now = 0.0
        self.auto = AutoCompression(mode, clock=lambda: self.now)
        self.link = link_bytes_s
        self.ratio = ratio
        self.cpu = compress_bytes_s
        self.reported_cpu: float | None = None
        """The compression speed the sender measures, if not the real one."""

    def run(self, chunks: int) -> float:
        start = self.now
        for _ in range(chunks):
            cpu_s = 0.0
            if self.auto.compress_next():
                cpu_s = CHUNK / self.cpu
                out = int(CHUNK * self.ratio)
                self.auto.compressed(CHUNK, out, CHUNK / (self.reported_cpu or self.cpu))
                compressed = out < CHUNK
                wire = out if compressed else CHUNK
            else:
                if self.auto.sample_next():
                    cpu_s = SAMPLE_BYTES / self.cpu
                    self.auto.compressed(SAMPLE_BYTES, int(SAMPLE_BYTES * self.ratio),
                                         SAMPLE_BYTES / (self.reported_cpu or self.cpu))
                compressed = False
                wire = CHUNK
            self.now += max(cpu_s, wire / self.link)
            self.auto.sent(CHUNK, wire + 8, compressed=compressed)
        return chunks * CHUNK / (self.now - start)


def test_slow_link_and_compressible_data_compress() -> None:
    sim = Sim(LinkCompression.AUTO, link_bytes_s=12.5e6, ratio=0.3)   # 100 Mbit/s
    sim.run(40)
    assert sim.auto.compress_next()
    plain = Sim(LinkCompression.NONE, link_bytes_s=12.5e6, ratio=0.3).run(400)
    auto = sim.run(400)
    assert auto > 2 * plain
    assert sim.auto.stats.chunks_compressed > 300


def test_fast_link_stays_plain() -> None:
    sim = Sim(LinkCompression.AUTO, link_bytes_s=2e9, ratio=0.3)   # loopback
    goodput = sim.run(2000)
    assert not sim.auto.compress_next()
    assert sim.auto.stats.chunks_compressed == 0
    plain = Sim(LinkCompression.NONE, link_bytes_s=2e9, ratio=0.3).run(2000)
    assert goodput > 0.9 * plain   # the samples cost little


def test_incompressible_data_stays_plain_on_a_slow_link() -> None:
    sim = Sim(LinkCompression.AUTO, link_bytes_s=12.5e6, ratio=1.0)
    sim.run(300)
    assert sim.auto.stats.chunks_compressed == 0


def test_a_compressed_window_measured_worse_turns_compression_off() -> None:
    # The model is told compression is fast, but the sender's compressed windows go
    # slower than plain (time lost where the timing of compress() does not see it):
    # the measured windows veto the model, and compression is retried now and then.
    sim = Sim(LinkCompression.AUTO, link_bytes_s=50e6, ratio=0.5, compress_bytes_s=40e6)
    sim.reported_cpu = 400e6
    assert sim.auto.predicted_compressed_goodput() is None
    plain = Sim(LinkCompression.NONE, link_bytes_s=50e6, ratio=0.5).run(1000)
    goodput = sim.run(1000)
    s = sim.auto.stats
    predicted = sim.auto.predicted_compressed_goodput()
    assert predicted is not None
    assert s.link_bytes_s is not None
    assert predicted > 1.5 * s.link_bytes_s
    assert s.windows_compressed >= 1                                   # so it was tried
    assert s.windows_plain > 3 * s.windows_compressed                  # and mostly vetoed
    assert goodput > 0.8 * plain


def test_compressing_still_measures_the_link_again() -> None:
    sim = Sim(LinkCompression.AUTO, link_bytes_s=12.5e6, ratio=0.3)
    sim.run(600)
    s = sim.auto.stats
    assert s.windows_compressed >= EXPLORE_EVERY
    assert s.windows_plain >= 2  # the first one, and at least one exploration
    # ... and when the link gets fast, compression stops.
    sim.link = 5e9
    sim.run(3000)
    assert not sim.auto.compress_next()


def test_fixed_modes_never_change() -> None:
    z = Sim(LinkCompression.ZSTD, link_bytes_s=5e9, ratio=0.9)
    z.run(500)
    assert z.auto.compress_next()
    assert z.auto.stats.chunks_compressed == 500
    n = Sim(LinkCompression.NONE, link_bytes_s=1e6, ratio=0.1)
    n.run(100)
    assert not n.auto.compress_next()
    assert not n.auto.sample_next()
    assert n.auto.stats.chunks_compressed == 0


def test_idle_drops_the_window() -> None:
    now = [0.0]
    auto = AutoCompression(clock=lambda: now[0])
    auto.sent(CHUNK, CHUNK, compressed=False)
    now[0] = 10.0           # the source had nothing to send for 10 s
    auto.idle()
    auto.sent(CHUNK, CHUNK, compressed=False)
    assert auto.stats.link_bytes_s is None
