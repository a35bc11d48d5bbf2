"""Checks of values that come from a peer, shared by the live layer's decoders.

Each returns the value with its type narrowed, or raises ValueError saying
what ``what`` should have been; the decoder turns that into a
RemoteProtocolError naming the field. ``bool`` is never taken for a number.
"""

from __future__ import annotations

import math

MAX_TEXT_BYTES = 4096
"""Any string from a peer (names, paths, a kernel command line, an error message)."""


def text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value.encode("utf-8", "replace")) > MAX_TEXT_BYTES:
        raise ValueError(f"{what} must be a string of at most {MAX_TEXT_BYTES} bytes")
    return value


def integer(value: object, what: str, low: int = -(1 << 63), high: int = (1 << 63) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r:.40}")
    return value


def finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r:.40}")
    return float(value)


def boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false")
    return value
