"""Google Compute Engine metadata: the ``preempted`` value, sans-IO.

The conversation (every request and answer carries ``Metadata-Flavor: Google``)::

    GET /computeMetadata/v1/instance/preempted
    <-- 200  FALSE                             ETag: 4a2d5e6f1b3c7d90
    GET /computeMetadata/v1/instance/preempted
            ?wait_for_change=true&last_etag=4a2d5e6f1b3c7d90&timeout_sec=60
        ... hangs until the value changes, or timeout_sec passes (then the same ETag) ...
    <-- 200  TRUE                              ETag: 0c6b8f2e9a1d4e57

The first GET has no ``wait_for_change``: without ``last_etag`` a hanging GET waits for
the *next* change, and would miss a preemption that happened before the watcher started.
``TRUE`` comes about 30 s before the ACPI soft-off; the provider states no time, so the
deadline is when the watcher saw it plus :data:`~ferry.spot.notice.WINDOW_S`.
"""

from __future__ import annotations

import datetime as dt
import re

from ferry.spot.errors import MetadataResponseError, snippet
from ferry.spot.messages import Request, Response, text_body, unexpected_status
from ferry.spot.notice import WINDOW_S, Action, Notice, Provider

PATH = "/computeMetadata/v1/instance/preempted"
FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
HANG_S = 60
"""``timeout_sec`` of each hanging GET: the server answers (unchanged) after this long."""
MAX_BODY_BYTES = 64
"""``TRUE`` or ``FALSE``."""
UNHONOURED_WAIT_S = 1.0
"""Pause when a hanging GET came back unchanged at once: a server that does not hang
must not make the watcher spin."""
_ETAG_RE = re.compile(r"^[0-9A-Za-z]{1,64}$")

P = Provider.GCP.value


def parse_preempted(response: Response) -> tuple[bool, str]:
    """(preempted?, ETag) of an answer about ``instance/preempted``."""
    if response.status != 200:
        raise unexpected_status(response, P, what="preempted")
    # A proxy or captive portal answering for 169.254.169.254 does not say this.
    if response.header(FLAVOR_HEADER) != FLAVOR:
        raise MetadataResponseError(
            f"preempted: answer lacks '{FLAVOR_HEADER}: {FLAVOR}' "
            f"(got {snippet(response.header(FLAVOR_HEADER))})", provider=P)
    etag = response.header("etag")
    if etag is None or not _ETAG_RE.match(etag):
        raise MetadataResponseError(f"preempted: bad ETag {snippet(etag)}", provider=P)
    value = text_body(response, P, what="preempted", max_bytes=MAX_BODY_BYTES).strip()
    if value not in ("TRUE", "FALSE"):
        raise MetadataResponseError(f"preempted is neither TRUE nor FALSE: {snippet(value)}",
                                    provider=P)
    return value == "TRUE", etag


class GcpCore:
    """A plain GET for the current value and its ETag, then hanging GETs."""

    provider = Provider.GCP

    def __init__(self, *, hang_s: int = HANG_S, window_s: float = WINDOW_S[Provider.GCP]) -> None:
        self.hang_s = hang_s
        self.window_s = window_s
        self._etag: str | None = None
        self._wait_s = 0.0

    def next_request(self, now: dt.datetime) -> Request:
        headers = {FLAVOR_HEADER: FLAVOR}
        if self._etag is None:
            return Request("GET", PATH, headers, max_body_bytes=MAX_BODY_BYTES)
        return Request("GET", f"{PATH}?wait_for_change=true&last_etag={self._etag}"
                              f"&timeout_sec={self.hang_s}", headers,
                       timeout_s=self.hang_s + 10.0, max_body_bytes=MAX_BODY_BYTES)

    def receive(self, request: Request, response: Response, now: dt.datetime) -> list[Notice]:
        preempted, etag = parse_preempted(response)
        hanging = self._etag is not None
        unchanged = etag == self._etag
        self._etag = etag
        self._wait_s = (UNHONOURED_WAIT_S
                        if hanging and unchanged and response.elapsed_s < self.hang_s / 2 else 0.0)
        if not preempted:
            return []
        deadline = now + dt.timedelta(seconds=self.window_s)
        return [Notice(Provider.GCP, Action.PREEMPT, deadline, now, key="preempted",
                       details={"preempted": "TRUE", "etag": etag})]

    def wait_s(self) -> float:
        return self._wait_s

    def failed(self) -> None:
        """Start again with a plain GET: the value may have changed while we could not ask."""
        self._etag = None

    def acknowledge(self, notice: Notice) -> Request | None:
        return None  # GCP takes no answer
