"""Fuzzing the launch exchange (offer parser, frame decoder) and the registry's request
handling with random and mutated input.

Whatever a peer sends, the destination's offer parser and the registry may only
raise typed ferry errors (a :class:`FerryError`), never KeyError, TypeError,
RecursionError, MemoryError...; and they must not allocate in proportion to a
number they were sent (checked with tracemalloc: a 2**40 size claimed by a
100-byte offer would show).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import tracemalloc
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.errors import FerryError
from ferry.live import launch, pkgserve
from ferry.live.bootcache import BootCache
from ferry.package import TrustStore
from ferry.testing.live import HOSTILE_OFFERS, frame, sample_offer
from ferry.transport.memory import memory_stream_pair

ALLOCATION_BOUND_BYTES = 4 * 1024 * 1024
"""Parsing an offer of a few KiB needs far less; a forged size or count would not."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=30)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_offers(draw: st.DrawFn) -> Any:
    """A valid offer with a few leaves or subtrees replaced by random JSON values."""
    offer = copy.deepcopy(sample_offer())
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(offer)
        path = draw(st.sampled_from(paths))
        node: Any = offer
        for key in path[:-1]:
            node = node[key]
        if draw(st.booleans()) and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = draw(json_values)
    return offer


def parse_measured(obj: Any) -> None:
    tracemalloc.start()
    try:
        with contextlib.suppress(FerryError):
            launch.Offer.from_json(obj)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOCATION_BOUND_BYTES, f"the offer parser allocated {peak} bytes"


@settings(max_examples=300, deadline=None)
@given(obj=json_values)
def test_random_json_is_refused_cleanly(obj: Any) -> None:
    parse_measured(obj)


@settings(max_examples=500, deadline=None)
@given(obj=mutated_offers())
def test_mutated_offers_are_parsed_or_refused_cleanly(obj: Any) -> None:
    parse_measured(obj)


def test_every_named_hostile_offer_stays_within_the_bound() -> None:
    for make in HOSTILE_OFFERS.values():
        parse_measured(make())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", launch.MAGIC]))
def test_random_frames_are_refused_cleanly(data: bytes, prefix: bytes) -> None:
    wire = prefix + data
    try:
        length = launch.decode_head(wire[:8]) if len(wire) >= 8 else 0
        launch.decode_body(wire[8:8 + length])
    except FerryError:
        pass


async def _registry_request(wire: bytes, directory: Path) -> None:
    a, b = memory_stream_pair()

    async def send() -> None:
        await a.send_all(wire)
        await a.send_eof()

    sender = asyncio.create_task(send())
    # serve_package catches and logs what it refuses; anything else escapes and fails.
    await pkgserve.serve_package(b, directory, TrustStore({}, directory / "trust"),
                                 cache_dir=directory / "cache")
    sender.cancel()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=json_values | st.dictionaries(st.just("package"), json_values, min_size=1),
       garbage=st.binary(max_size=64))
def test_registry_requests_are_refused_cleanly(tmp_path: Path, request: Any,
                                               garbage: bytes) -> None:
    tracemalloc.start()
    try:
        asyncio.run(_registry_request(frame(request) + garbage, tmp_path))
        asyncio.run(_registry_request(garbage, tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOCATION_BOUND_BYTES, f"the registry allocated {peak} bytes"


def test_offers_over_a_stream_are_refused_cleanly(tmp_path: Path) -> None:
    """The destination side end to end (frame decoder, parser, cache) on named hostile
    offers and truncations of a valid one."""
    valid = frame(sample_offer())
    wires = [frame(make()) for make in HOSTILE_OFFERS.values()]
    wires += [valid[:n] for n in range(0, len(valid), 97)]
    wires.append(frame(json.loads(json.dumps(sample_offer()))) + b"\xff" * 10)

    async def one(wire: bytes) -> None:
        a, b = memory_stream_pair()

        async def send() -> None:
            await a.send_all(wire)
            await a.send_eof()

        sender = asyncio.create_task(send())
        with contextlib.suppress(FerryError):
            await launch.receive_offer(b, BootCache(tmp_path / "cache"), idle_timeout_s=1.0)
        sender.cancel()

    for wire in wires:
        asyncio.run(one(wire))
