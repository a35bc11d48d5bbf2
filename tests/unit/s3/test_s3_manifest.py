"""The checkpoint manifest codec: round trips, and every malformed input refused."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.errors import ConfigError
from ferry.s3 import manifest as mf
from ferry.s3.errors import ManifestFormatError

BS = 4096


@st.composite
def manifests(draw: st.DrawFn) -> mf.Manifest:
    object_size = draw(st.sampled_from([4096, 8192, 3 * 4096, 1 << 20]))
    size = draw(st.integers(0, 40 * object_size))
    n = mf.object_count(size, object_size)
    objects = tuple(draw(st.lists(st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
                                  min_size=n, max_size=n)))
    return mf.Manifest(draw(st.integers(1, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)),
                       size, BS, object_size, objects)


@given(manifests())
def test_round_trip(m: mf.Manifest) -> None:
    assert mf.decode(mf.encode(m)) == m


@given(manifests(), st.data())
@settings(max_examples=50)
def test_every_truncation_is_refused(m: mf.Manifest, data: st.DataObject) -> None:
    raw = mf.encode(m)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ManifestFormatError):
        mf.decode(raw[:cut])


def test_every_bit_flip_is_refused() -> None:
    digest = hashlib.sha256(b"x").digest()
    raw = mf.encode(mf.Manifest(7, 123, 5 * BS + 100, BS, BS, (digest, None, None, digest,
                                                                None, digest)))
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ManifestFormatError):
            mf.decode(bytes(flipped))


def test_padding_is_refused() -> None:
    raw = mf.encode(mf.Manifest(1, 0, BS, BS, BS, (None,)))
    with pytest.raises(ManifestFormatError, match="truncated or padded"):
        mf.decode(raw + b"\0")


def _forge(header: tuple[object, ...], rest: bytes = b"") -> bytes:
    body = struct.pack("<8sIIQQQIIII", *header) + rest
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(("header", "rest", "message"), [
    ((b"NOTFERRY", 1, 0, 1, 0, BS, BS, BS, 1, 0), b"\0", "bad magic"),
    ((mf.MAGIC, 2, 0, 1, 0, BS, BS, BS, 1, 0), b"\0", "version 2"),
    ((mf.MAGIC, 1, 4, 1, 0, BS, BS, BS, 1, 0), b"\0", "unknown flags"),
    ((mf.MAGIC, 1, 0, 0, 0, BS, BS, BS, 1, 0), b"\0", "sequence 0"),
    ((mf.MAGIC, 1, 0, 1, 0, BS, BS, BS, 2, 0), b"\0", "says 2 objects"),
    ((mf.MAGIC, 1, 0, 1, 0, BS, BS, 1000, 1, 0), b"\0", "bad geometry"),
    ((mf.MAGIC, 1, 0, 1, 0, BS, 4096, 6144, 1, 0), b"\0", "bad geometry"),
    ((mf.MAGIC, 1, 0, 1, 0, BS, BS, BS, 1, 2), b"\0", "2 stored objects out of 1"),
    ((mf.MAGIC, 1, 0, 1, 0, BS, BS, BS, 1, 1), b"\0" + bytes(32), "bitmap marks 0"),
    ((mf.MAGIC, 1, 0, 1, 0, BS, BS, BS, 1, 0), b"\x02", "padding bits"),
    # A device of 2**50 bytes in 4 KiB objects: far more than MAX_OBJECTS.
    ((mf.MAGIC, 1, 0, 1, 0, 2**50, BS, BS, 2**32 - 1, 0), b"", "bad geometry"),
])
def test_malformed_headers_are_refused(header: tuple[object, ...], rest: bytes,
                                       message: str) -> None:
    with pytest.raises(ManifestFormatError, match=message):
        mf.decode(_forge(header, rest), key="k")


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestFormatError, match="more than"):
        mf.decode(b"\0" * (mf.MAX_MANIFEST_BYTES + 1))


def test_largest_manifest_fits_its_bound() -> None:
    osz = mf.DEFAULT_OBJECT_SIZE_BYTES
    m = mf.Manifest(1, 0, mf.MAX_OBJECTS * osz, 64 * 1024, osz,
                    (hashlib.sha256(b"").digest(),) * mf.MAX_OBJECTS)
    raw = mf.encode(m)
    assert len(raw) == mf.MAX_MANIFEST_BYTES
    assert mf.decode(raw).objects[-1] == m.objects[-1]


@pytest.mark.parametrize(("size", "block", "obj"), [
    (-1, BS, BS), (BS, 1000, BS), (BS, BS, 2048), (BS, BS, 6144),
    (BS, BS, mf.MAX_OBJECT_SIZE_BYTES * 2), (mf.MAX_OBJECTS * BS + 1, BS, BS),
])
def test_geometry_checks(size: int, block: int, obj: int) -> None:
    with pytest.raises(ConfigError):
        mf.check_geometry(size, block, obj)


def test_manifest_checks_its_object_list() -> None:
    with pytest.raises(ConfigError, match="lists 1 objects"):
        mf.Manifest(1, 0, 2 * BS, BS, BS, (None,))
    with pytest.raises(ConfigError, match="32 bytes"):
        mf.Manifest(1, 0, BS, BS, BS, (b"short",))
    m = mf.Manifest(1, 0, 2 * BS + 5, BS, BS, (None, b"a" * 32, b"a" * 32))
    assert m.object_length(2) == 5
    assert m.stored() == {b"a" * 32}
