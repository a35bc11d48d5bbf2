"""Unit tests: the work queue, the dirty policy, block-run encoding, config and endpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ferry.errors import ConfigError, IntegrityError, RemoteProtocolError
from ferry.migration.blocks import Compression, decode_run, encode_run
from ferry.migration.config import load_config, parse_config
from ferry.migration.policy import DirtyPolicy, Mode
from ferry.migration.schedule import Run, WorkQueue
from ferry.protocol.messages import Encoding, WriteBlocks
from ferry.storage.device import Geometry
from ferry.transport.endpoint import Scheme, parse_endpoint


async def test_work_queue_batches_runs_and_never_hands_out_a_block_twice() -> None:
    q = WorkQueue([10, 3], max_run_blocks=4)
    q.push(0, range(10))
    q.push(1, [2, 0])
    first = q.next_run()
    assert first == Run(0, 0, 4)
    assert q.next_run() == Run(0, 4, 4)
    # Block 1 is in flight: pushing it again queues it, but it is not handed out
    # while the first transfer is in flight.
    q.push(0, [1])
    assert q.next_run() == Run(0, 8, 2)
    assert q.next_run() == Run(1, 2, 1)
    assert q.next_run() == Run(1, 0, 1)
    assert q.next_run() is None
    assert first is not None
    q.done(first)  # block 1 was pushed again while in flight: it goes back in line
    assert q.next_run() == Run(0, 1, 1)
    assert q.next_run() is None


async def test_work_queue_urgent_blocks_jump_the_queue_and_discard_forgets() -> None:
    q = WorkQueue([100], max_run_blocks=1)
    q.push(0, range(100))
    assert q.push_urgent(0, [77]) == 1
    assert q.next_run() == Run(0, 77, 1)
    q.discard(0, [0, 1])
    assert q.next_run() == Run(0, 2, 1)
    assert q.push_urgent(0, [77]) == 0  # already sent: nothing to move


async def test_work_queue_drained_only_when_nothing_pending_or_in_flight() -> None:
    q = WorkQueue([2])
    q.push(0, [0, 1])
    run = q.next_run()
    assert run is not None
    assert q.pending_count == 0
    assert q.inflight_count == 2
    assert not q._drained.is_set()
    q.done(run)
    await q.wait_drained()


def test_dirty_policy_converges_after_cycles_below_or_max() -> None:
    p = DirtyPolicy(max_dirty_blocks=10, min_cycles_below=2, max_cycles=5)
    assert not p.converged(cycles=1, cycles_below=1)
    assert p.converged(cycles=2, cycles_below=2)
    assert p.converged(cycles=5, cycles_below=0)
    with pytest.raises(ConfigError):
        DirtyPolicy(cycle_throttle_s=-1)
    stalls = DirtyPolicy(max_cycles=20, max_cycles_without_progress=3)
    assert not stalls.converged(cycles=4, cycles_below=0, cycles_stalled=2)
    assert stalls.converged(cycles=4, cycles_below=0, cycles_stalled=3)
    never = DirtyPolicy(max_cycles=20, max_cycles_without_progress=0)
    assert not never.converged(cycles=4, cycles_below=0, cycles_stalled=10)


@pytest.mark.parametrize("compression", list(Compression))
def test_encode_decode_run_round_trip_with_zero_runs_split_out(compression: Compression) -> None:
    g = Geometry(5 * 4096 + 100, 4096)
    data = bytearray(os.urandom(g.size_bytes))
    data[4096 : 3 * 4096] = bytes(2 * 4096)  # blocks 1 and 2 are zero
    events = encode_run(0, 0, g, bytes(data), compression)
    assert [e.encoding for e in events][1] is Encoding.ZEROES
    assert sum(len(e.hashes) for e in events) == 6
    out = b"".join(decode_run(e, g, "d") for e in events)
    assert out == bytes(data)


def test_decode_run_names_the_corrupt_block_and_rejects_bad_shapes() -> None:
    g = Geometry(4 * 4096, 4096)
    (event,) = encode_run(0, 1, g, os.urandom(2 * 4096))
    bad = bytearray(event.data)
    bad[4096 + 7] ^= 1
    with pytest.raises(IntegrityError) as info:
        decode_run(WriteBlocks(0, 1, event.encoding, event.hashes, bytes(bad)), g, "disk")
    assert (info.value.device, info.value.block) == ("disk", 2)
    with pytest.raises(RemoteProtocolError):
        decode_run(WriteBlocks(0, 3, event.encoding, event.hashes, event.data), g, "disk")
    with pytest.raises(RemoteProtocolError):
        decode_run(WriteBlocks(0, 1, event.encoding, event.hashes, event.data[:-1]), g, "disk")


def test_config_parses_and_names_bad_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "ferry.toml"
    cfg.write_text(
        '[migration]\nmode = "precopy-only"\ncompression = "zstd"\n'
        "[migration.policy]\nmax_cycles = 3\ncycle_throttle_s = 1\n"
        '[[device]]\nname = "disk"\npath = "disk.img"\n'
    )
    config = load_config(cfg)
    assert config.migration.mode is Mode.PRECOPY_ONLY
    assert config.migration.compression is Compression.ZSTD
    assert config.migration.policy.max_cycles == 3
    assert config.devices[0].path == tmp_path / "disk.img"
    with pytest.raises(ConfigError, match=r"in migration: concurency"):
        parse_config({"migration": {"concurency": 2}})
    with pytest.raises(ConfigError, match="must be one of"):
        parse_config({"migration": {"mode": "yolo"}})
    with pytest.raises(ConfigError, match="unique"):
        parse_config({"device": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    (tmp_path / "bad.toml").write_text("[[[")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")


def test_endpoints() -> None:
    assert parse_endpoint("127.0.0.1:7000").port == 7000
    assert parse_endpoint("tcp://[::1]:1").host == "::1"
    assert parse_endpoint("unix:///run/x.sock").path == "/run/x.sock"
    assert parse_endpoint("stdio").scheme is Scheme.STDIO
    assert parse_endpoint("exec:ssh h ferry serve").argv == ("ssh", "h", "ferry", "serve")
    for bad in ("nohost", "h:99999", "unix:relative", "exec:", "h:x"):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)
