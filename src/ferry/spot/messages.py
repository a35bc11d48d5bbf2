"""The sans-IO vocabulary every provider's core speaks: requests to make, responses got,
and the checks every response goes through.

A provider core (:mod:`.aws`, :mod:`.gcp`, :mod:`.azure`) never touches a socket: it
says which :class:`Request` to make next, and turns a :class:`Response` into notices or
a :class:`~ferry.spot.errors.MetadataResponseError`. The I/O loop (:mod:`.watch`) makes
the requests with httpx and reads at most ``max_body_bytes`` of each body, so a huge
body is refused before it is held in memory.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.spot.errors import MetadataResponseError, snippet

PAST_SLACK_S = 30.0
"""A deadline this far in the past is still taken (as "now"): clocks differ a little
between the machine and its provider, and a notice seen late is still a notice. Further
back, the response is stale or made up."""
MAX_HORIZON_S = 3600.0
"""A deadline further ahead than this is refused. The longest documented lead is Azure's
15 minutes (Terminate, Redeploy); an hour leaves room, and a year away is nonsense."""
MAX_JSON_DEPTH = 8
"""Nesting deeper than any provider's document: refused before it costs a recursion."""


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request to the metadata service (``path`` includes the query)."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    timeout_s: float = 5.0
    """How long the whole request may take (a GCP hanging GET waits much longer)."""
    max_body_bytes: int = 4096
    """A longer response body is refused unread."""


@dataclass(frozen=True, slots=True)
class Response:
    """The status, headers (names lower-case) and body of one response."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    elapsed_s: float = 0.0
    """How long the request took (a hanging GET that returns at once did not hang)."""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def check_size(response: Response, max_bytes: int, provider: str, *, what: str) -> None:
    """A body longer than ``max_bytes`` is refused before it is decoded (the I/O loop
    already stops reading there; this holds for a response from anywhere)."""
    if len(response.body) > max_bytes:
        raise MetadataResponseError(f"{what}: body of {len(response.body)} bytes "
                                    f"(at most {max_bytes})", provider=provider)


def text_body(response: Response, provider: str, *, what: str, max_bytes: int = 4096) -> str:
    """The body as printable ASCII (metadata values are), else a typed error."""
    check_size(response, max_bytes, provider, what=what)
    try:
        text = response.body.decode("ascii")
    except UnicodeDecodeError:
        raise MetadataResponseError(f"{what} is not ASCII: {snippet(response.body)}",
                                    provider=provider) from None
    if not all(c.isprintable() or c in "\r\n\t" for c in text):
        raise MetadataResponseError(f"{what} has control characters: {snippet(text)}",
                                    provider=provider)
    return text


def json_object(response: Response, provider: str, *, what: str,
                max_bytes: int = 4096) -> dict[str, Any]:
    """The body as one JSON object, bounded in size and depth, else a typed error."""
    check_size(response, max_bytes, provider, what=what)
    try:
        text = response.body.decode("utf-8")
    except UnicodeDecodeError:
        raise MetadataResponseError(f"{what} is not UTF-8: {snippet(response.body)}",
                                    provider=provider) from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise MetadataResponseError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels",
                                    provider=provider)
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise MetadataResponseError(f"{what} is not JSON ({exc}): {snippet(text)}",
                                    provider=provider) from None
    if not isinstance(value, dict):
        raise MetadataResponseError(f"{what} is not a JSON object: {snippet(value)}",
                                    provider=provider)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(text: str) -> int:
    """The deepest bracket nesting of ``text`` (strings skipped), counted without parsing."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def field_of(obj: Mapping[str, Any], name: str, kind: type, provider: str, *,
             what: str) -> Any:
    """``obj[name]``, which must exist and be a ``kind`` (a bool is not an int)."""
    if name not in obj:
        raise MetadataResponseError(f"{what} has no {name!r}", provider=provider)
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MetadataResponseError(
            f"{what}: {name!r} is not a {kind.__name__}: {snippet(value)}", provider=provider)
    return value


def check_deadline(when: dt.datetime, now: dt.datetime, provider: str, *,
                   what: str) -> dt.datetime:
    """``when`` if it is a plausible deadline seen at ``now`` (a little late is "now")."""
    ahead = (when - now).total_seconds()
    if ahead < -PAST_SLACK_S:
        raise MetadataResponseError(
            f"{what} {when.isoformat()} is {-ahead:.0f} s in the past", provider=provider)
    if ahead > MAX_HORIZON_S:
        raise MetadataResponseError(
            f"{what} {when.isoformat()} is {ahead:.0f} s ahead (at most {MAX_HORIZON_S:.0f})",
            provider=provider)
    return max(when, now)


def unexpected_status(response: Response, provider: str, *, what: str) -> MetadataResponseError:
    return MetadataResponseError(f"{what}: unexpected HTTP {response.status}: "
                                 f"{snippet(response.body)}", provider=provider)
