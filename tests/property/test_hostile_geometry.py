"""Fuzzing the geometry check: whatever a Hello describes, either it is refused
with GeometryRefusedError or it fits every limit (so what the receiver then
allocates is bounded by the limits, never by the peer)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.migration.limits import (
    MAX_BLOCK_SIZE_BYTES,
    GeometryRefusedError,
    ReceiveLimits,
)
from ferry.protocol.messages import DeviceInfo

LIMITS = ReceiveLimits(
    max_devices=8, max_device_bytes=1 << 30, max_total_bytes=1 << 31, max_total_blocks=1 << 16
)

names = st.one_of(
    st.sampled_from(["a", "b", "..", ".", "", "x/y", "a.partial", "n\x00", "é"]),
    st.text(min_size=0, max_size=300),
)
devices = st.builds(
    DeviceInfo,
    name=names,
    size_bytes=st.integers(min_value=-1, max_value=1 << 64),
    block_size_bytes=st.one_of(
        st.integers(min_value=0, max_value=1 << 32), st.sampled_from([512, 4096, 65536])
    ),
)


@settings(max_examples=500)
@given(st.lists(devices, max_size=12))
def test_geometry_is_refused_or_within_every_limit(group: list[DeviceInfo]) -> None:
    try:
        LIMITS.check(group)
    except GeometryRefusedError:
        return
    assert 1 <= len(group) <= LIMITS.max_devices
    assert len({d.name for d in group}) == len(group)
    total_blocks = 0
    for d in group:
        assert d.name
        assert 512 <= d.block_size_bytes <= MAX_BLOCK_SIZE_BYTES
        assert d.block_size_bytes % 512 == 0
        assert 0 <= d.size_bytes <= LIMITS.max_device_bytes
        total_blocks += -(-d.size_bytes // d.block_size_bytes)
    assert sum(d.size_bytes for d in group) <= LIMITS.max_total_bytes
    assert total_blocks <= LIMITS.max_total_blocks
