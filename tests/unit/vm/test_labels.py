"""Labels: parsed from KEY=VALUE, bounded and checked, matched by ``--filter label=``."""

from __future__ import annotations

import pytest

from ferry.errors import ConfigError
from ferry.vm.labels import MAX_LABELS, check_labels, matches, parse_labels


def test_parse_and_match() -> None:
    got = parse_labels(["team=db", "tier=gold", "team=cache", "flag="])
    assert got == {"team": "cache", "tier": "gold", "flag": ""}
    assert matches(got, "team")
    assert matches(got, "team=cache")
    assert not matches(got, "team=db")
    assert not matches(got, "owner")


@pytest.mark.parametrize("bad", [
    {"": "x"}, {"-a": "x"}, {"a-": "x"}, {"A": "x"}, {"a b": "x"}, {"a" * 64: "x"},
    {"a": "x" * 256}, {"a": "tab\there"}, {"a": 1},
    {f"k{i}": "v" for i in range(MAX_LABELS + 1)},
])
def test_bad_labels_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        check_labels(bad)


def test_a_label_without_a_value_separator_is_refused() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_labels(["team"])
