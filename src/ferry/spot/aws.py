"""AWS EC2 instance metadata (IMDSv2): the spot ``instance-action`` notice, sans-IO.

The conversation (IMDSv2 needs a session token on every request)::

    PUT /latest/api/token                         X-aws-ec2-metadata-token-ttl-seconds: 21600
    <-- 200  AQAEAF...token...==
    GET /latest/meta-data/spot/instance-action    X-aws-ec2-metadata-token: AQAEAF...
    <-- 404                                       no notice (every 5 s, as AWS advises)
    GET /latest/meta-data/spot/instance-action
    <-- 200  {"action": "terminate", "time": "2026-12-03T16:22:00Z"}
    GET ...                                       (an expired token)
    <-- 401                                       -> PUT a new token, then GET again

The item appears two minutes before the action; ``action`` is ``terminate``, ``stop`` or
``hibernate``; ``time`` is when it happens (UTC).
"""

from __future__ import annotations

import datetime as dt
import re

from ferry.spot.errors import MetadataResponseError, snippet
from ferry.spot.messages import (
    Request,
    Response,
    check_deadline,
    field_of,
    json_object,
    text_body,
    unexpected_status,
)
from ferry.spot.notice import Action, Notice, Provider

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_S = 21600
"""The longest session IMDSv2 grants (6 hours)."""
TOKEN_REFRESH_S = 300
"""A token is replaced this long before it expires, so no poll meets an expired one."""
POLL_INTERVAL_S = 5.0
"""AWS advises checking every 5 s: 24 looks inside the two-minute window."""
MAX_TOKEN_BYTES = 1024
"""Tokens are about 56 characters of base64."""
MAX_ACTION_BYTES = 4096
"""The notice is about 50 bytes of JSON."""
_TOKEN_RE = re.compile(r"^[A-Za-z0-9+/=_-]+$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
ACTIONS = {"terminate": Action.TERMINATE, "stop": Action.STOP, "hibernate": Action.HIBERNATE}

P = Provider.AWS.value


def parse_token(response: Response) -> str:
    """The session token of a ``PUT /latest/api/token`` answer."""
    if response.status != 200:
        raise unexpected_status(response, P, what="token")
    token = text_body(response, P, what="token", max_bytes=MAX_TOKEN_BYTES).strip()
    if not token or len(token) > MAX_TOKEN_BYTES or not _TOKEN_RE.match(token):
        raise MetadataResponseError(f"token is not a token: {snippet(token)}", provider=P)
    return token


def parse_time(text: str) -> dt.datetime:
    """``2026-12-03T16:22:00Z`` as an aware UTC datetime."""
    if not _TIME_RE.match(text):
        raise MetadataResponseError(f"time is not ISO 8601 UTC: {snippet(text)}", provider=P)
    try:
        when = dt.datetime.fromisoformat(text[:-1][:26])
    except ValueError:
        raise MetadataResponseError(f"time is not a date: {snippet(text)}", provider=P) from None
    return when.replace(tzinfo=dt.UTC)


def parse_instance_action(response: Response, now: dt.datetime) -> Notice | None:
    """The notice in a ``GET spot/instance-action`` answer: None for 404 (no notice)."""
    if response.status == 404:
        return None
    if response.status != 200:
        raise unexpected_status(response, P, what="instance-action")
    doc = json_object(response, P, what="instance-action", max_bytes=MAX_ACTION_BYTES)
    action = field_of(doc, "action", str, P, what="instance-action")
    if action not in ACTIONS:
        raise MetadataResponseError(f"instance-action: unknown action {snippet(action)}",
                                    provider=P)
    text = field_of(doc, "time", str, P, what="instance-action")
    deadline = check_deadline(parse_time(text), now, P, what="instance-action time")
    return Notice(Provider.AWS, ACTIONS[action], deadline, now, key=f"{action}@{text}",
                  details=doc)


class AwsCore:
    """The IMDSv2 conversation: a token, then polls; a 401 fetches a new token."""

    provider = Provider.AWS

    def __init__(self, *, poll_interval_s: float = POLL_INTERVAL_S,
                 token_ttl_s: int = TOKEN_TTL_S) -> None:
        self.poll_interval_s = poll_interval_s
        self.token_ttl_s = token_ttl_s
        self._token: str | None = None
        self._renew_at: dt.datetime | None = None
        self._wait_s = 0.0

    def next_request(self, now: dt.datetime) -> Request:
        if self._token is None or (self._renew_at is not None and now >= self._renew_at):
            return Request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl_s)},
                           max_body_bytes=MAX_TOKEN_BYTES)
        return Request("GET", ACTION_PATH, {TOKEN_HEADER: self._token},
                       max_body_bytes=MAX_ACTION_BYTES)

    def receive(self, request: Request, response: Response, now: dt.datetime) -> list[Notice]:
        if request.path == TOKEN_PATH:
            self._token = parse_token(response)
            self._renew_at = now + dt.timedelta(
                seconds=max(1, self.token_ttl_s - min(TOKEN_REFRESH_S, self.token_ttl_s // 2)))
            self._wait_s = 0.0
            return []
        if response.status == 401:  # expired or revoked: a new token, then ask again
            self._token = None
            self._wait_s = 0.0
            return []
        self._wait_s = self.poll_interval_s
        notice = parse_instance_action(response, now)
        return [] if notice is None else [notice]

    def wait_s(self) -> float:
        return self._wait_s

    def failed(self) -> None:
        """After an error the token is kept: a 401 says when it is bad."""

    def acknowledge(self, notice: Notice) -> Request | None:
        return None  # AWS takes no answer
