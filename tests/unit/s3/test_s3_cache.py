"""The object cache: never more bytes than its capacity, least recently used out first."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.errors import ConfigError
from ferry.s3.cache import ObjectCache

KEYS = st.sampled_from([bytes([i]) * 32 for i in range(6)])
OPS = st.lists(st.tuples(st.sampled_from(["get", "put"]), KEYS, st.integers(0, 40)),
               max_size=60)


@given(st.integers(0, 100), OPS)
def test_matches_a_model_lru_and_stays_within_capacity(capacity: int,
                                                       ops: list[tuple[str, bytes, int]]
                                                       ) -> None:
    cache = ObjectCache(capacity)
    model: OrderedDict[bytes, bytes] = OrderedDict()
    for op, key, size in ops:
        if op == "get":
            got = cache.get(key)
            assert got == model.get(key)
            if key in model:
                model.move_to_end(key)
        else:
            data = key[:1] * size
            cache.put(key, data)
            model.pop(key, None)
            if size <= capacity:
                while sum(map(len, model.values())) + size > capacity:
                    model.popitem(last=False)
                model[key] = data
        assert cache.size_bytes == sum(map(len, model.values())) <= capacity
        assert len(cache) == len(model)
        assert all(k in cache for k in model)


def test_object_larger_than_capacity_is_not_kept() -> None:
    cache = ObjectCache(10)
    cache.put(b"a", b"12345")
    cache.put(b"b", b"x" * 11)
    assert cache.get(b"b") is None
    assert cache.get(b"a") == b"12345"  # and nothing was evicted for it
    assert (cache.hits, cache.misses) == (1, 1)


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ConfigError):
        ObjectCache(-1)
