"""The cluster's records: round trips, and every malformed value a typed error."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.cluster import keys as k
from ferry.cluster.errors import ClusterError
from ferry.cluster.store import parse_url
from ferry.errors import ConfigError

RECORDS = [
    k.NodeRecord("n1", "10.0.0.1:7480", ["token"], "10.0.0.1", 1 << 30, 8, 1 << 28, 2, 2,
                 1.5, "0.1.0"),
    k.NodeState(k.NodeStatus.DEAD, 2.0, ["v1", "v2"]),
    k.Cordon(k.CordonReason.NOTICE, 3.0, "gcp preemption"),
    k.Placement("v1", "n1", 1 << 28, "running", 4.0),
    k.MigrationRecord("m1", "v1", "n1", "n2", k.OpState.FAILED, 5.0, 6.0, "reset"),
    k.OperationRecord("o1", "evacuate", "n1", k.OpState.SUCCEEDED, 7.0, 37.0, 20.0,
                      {"moved": [], "complete": True}),
    k.DrainRequest(100.0, 70.0),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip(record: object) -> None:
    assert k.decode(type(record), k.encode(record)) == record


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"\xff\xfe", b"[]", b"null", b"7",
    b'{"status": "zombie", "since": 1}',  # not a NodeStatus
    b'{"status": "dead"}',  # since missing
    b'{"status": "dead", "since": "yesterday"}',
    b'{"status": "dead", "since": true}',  # a bool is no number
    b'{"status": "dead", "since": 1, "vms": [1, 2]}',
    b'{"status": "dead", "since": 1, "vms": "v1"}',
    b'{"status": "dead", "since": 1, "x": "' + b"a" * k.MAX_VALUE_BYTES + b'"}',
])
def test_malformed_values_are_cluster_errors(raw: bytes) -> None:
    with pytest.raises(ClusterError):
        k.decode(k.NodeState, raw, where=b"/ferry/state/x")


def test_unknown_fields_are_ignored_and_ints_are_floats() -> None:
    got = k.decode(k.NodeState, b'{"status": "alive", "since": 3, "future": 1}')
    assert got == k.NodeState(k.NodeStatus.ALIVE, 3.0)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_cluster_error(raw: bytes) -> None:
    for cls in (k.NodeRecord, k.Placement, k.OperationRecord):
        with contextlib.suppress(ClusterError):  # anything else fails the test
            k.decode(cls, raw)


@pytest.mark.parametrize("name", ["", "A", "-x", "a/b", "a" * 64, "n 1", "../x"])
def test_names_are_checked(name: str) -> None:
    with pytest.raises(ClusterError):
        k.key(k.NODES, name)


def test_node_capacity_is_checked() -> None:
    with pytest.raises(ClusterError):
        k.NodeRecord("n1", "h:1", [], "h", -1, 8)


def test_cluster_urls() -> None:
    assert parse_url("etcd://10.0.0.9:2379,[::1]:2380") == [("10.0.0.9", 2379), ("::1", 2380)]
    for bad in ("http://h:1", "etcd://", "etcd://h", "etcd://h:0", "etcd://h:x"):
        with pytest.raises(ConfigError):
            parse_url(bad)
