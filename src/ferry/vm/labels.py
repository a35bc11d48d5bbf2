"""Labels: a VM's ``key=value`` tags (``ferry vm run --label``), kept in its records,
shown by ``vm ls`` / ``inspect`` and the API, carried by a migration and a suspend.

At most :data:`MAX_LABELS`; a key is 1..63 of ``[a-z0-9._/-]`` beginning and ending with a
letter or digit (as Kubernetes' name part); a value at most :data:`MAX_VALUE` printable
characters. A peer's labels (a migration's offer) are checked the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ferry.errors import ConfigError

MAX_LABELS = 32
MAX_VALUE = 255
_KEY_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._/-]{0,61}[a-z0-9])?$")


def check_labels(labels: object) -> dict[str, str]:
    """``labels`` as a checked dict; :class:`ConfigError` naming the first bad entry."""
    if not isinstance(labels, Mapping):
        raise ConfigError("labels must be a mapping of key to value")
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"at most {MAX_LABELS} labels, not {len(labels)}")
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ConfigError(f"label key {key!r:.70}: 1..63 of [a-z0-9._/-], starting and "
                              "ending with a letter or digit")
        if not isinstance(value, str) or len(value) > MAX_VALUE or not value.isprintable():
            raise ConfigError(f"label {key}: the value must be at most {MAX_VALUE} printable "
                              "characters")
        out[key] = value
    return out


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments (``--label``); a key given twice keeps its last value."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--label {item!r:.70}: give KEY=VALUE")
        labels[key] = value
    return check_labels(labels)


def matches(labels: Mapping[str, str], selector: str) -> bool:
    """``KEY`` (the label is set) or ``KEY=VALUE``, as ``vm ls --filter label=...``."""
    key, sep, value = selector.partition("=")
    return key in labels and (not sep or labels[key] == value)
