"""The zstd frame tracker: any split of the input gives the same answer; cuts are noticed."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard

from ferry.package.errors import PackageFormatError
from ferry.package.zstdframes import ZstdFrameTracker


def frames() -> bytes:
    data = os.urandom(3000) + bytes(300_000) + b"tail"
    plain = zstandard.ZstdCompressor(level=3).compress(data)
    checked = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(b"small")
    skippable = struct.pack("<II", 0x184D2A5E, 5) + b"meta!"
    return plain + skippable + checked + nosize + zstandard.ZstdCompressor().compress(b"")


def test_whole_and_byte_at_a_time_agree() -> None:
    data = frames()
    whole = ZstdFrameTracker()
    whole.feed(data)
    assert whole.at_frame_end
    assert whole.frames == 4
    one = ZstdFrameTracker()
    ends = []
    for i in range(len(data)):
        one.feed(data[i : i + 1])
        ends.append(one.at_frame_end)
    assert one.at_frame_end
    assert one.frames == 4
    assert sum(ends) == 5  # after each frame, including the skippable one (after frame 1)


def test_every_cut_inside_a_frame_is_noticed() -> None:
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(500) + bytes(9000))
    for cut in range(len(frame)):
        t = ZstdFrameTracker()
        t.feed(frame[:cut])
        assert not t.at_frame_end, cut


@pytest.mark.parametrize("junk", [b"garbage!", b"\x00\x00\x00\x00"])
def test_garbage_after_a_frame_is_refused(junk: bytes) -> None:
    t = ZstdFrameTracker()
    with pytest.raises(PackageFormatError, match="not zstd"):
        t.feed(zstandard.ZstdCompressor().compress(b"x") + junk)
