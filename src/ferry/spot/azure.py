"""Azure Instance Metadata Service: Scheduled Events, sans-IO.

The conversation (every request carries ``Metadata: true``)::

    GET /metadata/instance/compute/name?api-version=2021-02-01&format=text
    <-- 200  node-1                                 (this VM's name, unless given)
    GET /metadata/scheduledevents?api-version=2020-07-01
    <-- 200  {"DocumentIncarnation": 1, "Events": []}
    GET /metadata/scheduledevents?api-version=2020-07-01          (every second)
    <-- 200  {"DocumentIncarnation": 2, "Events": [
               {"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
                "ResourceType": "VirtualMachine", "Resources": ["node-1"],
                "EventStatus": "Scheduled", "NotBefore": "Thu, 03 Dec 2026 16:22:00 GMT",
                "Description": "...", "EventSource": "Platform", "DurationInSeconds": -1}]}
    POST /metadata/scheduledevents?api-version=2020-07-01
         {"StartRequests": [{"EventId": "602d9444-d2cd-49c7-8624-8643e7171297"}]}
    <-- 200                                         (acknowledged: Azure may act at once)

An event counts only if its ``Resources`` name this VM (one document lists the events of
every VM in the availability set or scale set). ``Preempt`` (spot eviction, at least 30 s
ahead) and ``Terminate`` (scale-set delete) are notices; ``Freeze``, ``Reboot`` and
``Redeploy`` are not. A ``Started`` event has an empty ``NotBefore``: its deadline is now.
Acknowledging tells Azure to go ahead *now*: do it once the VMs are out, not on sight.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
from typing import Any

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

API_VERSION = "2020-07-01"
EVENTS_PATH = f"/metadata/scheduledevents?api-version={API_VERSION}"
NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
METADATA_HEADER = "Metadata"
POLL_INTERVAL_S = 1.0
"""A Preempt may be only 30 s ahead: look every second."""
FIRST_TIMEOUT_S = 120.0
"""The first request to Scheduled Events turns them on for the VM and may take up to
two minutes to answer."""
MAX_BODY_BYTES = 256 * 1024
"""A document lists the events of a whole availability or scale set: a few KiB."""
MAX_EVENTS = 100
MAX_RESOURCES = 1000
MAX_NAME_CHARS = 128
EVICTIONS = {"Preempt": Action.PREEMPT, "Terminate": Action.TERMINATE}
STATUSES = {"Scheduled", "Started"}
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WORD_RE = re.compile(r"^[A-Za-z]{1,32}$")
_RFC1123_RE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
                         r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                         r"\d{2}:\d{2}:\d{2} GMT$")

P = Provider.AZURE.value


def parse_vm_name(response: Response) -> str:
    """This VM's name, from ``compute/name``."""
    if response.status != 200:
        raise unexpected_status(response, P, what="compute/name")
    name = text_body(response, P, what="compute/name").strip()
    if not _NAME_RE.match(name):
        raise MetadataResponseError(f"compute/name is not a VM name: {snippet(name)}",
                                    provider=P)
    return name


def parse_not_before(text: str) -> dt.datetime | None:
    """``Thu, 03 Dec 2026 16:22:00 GMT`` as an aware UTC datetime; None for ``""``."""
    if text == "":
        return None
    if not _RFC1123_RE.match(text):
        raise MetadataResponseError(f"NotBefore is not an RFC 1123 date: {snippet(text)}",
                                    provider=P)
    try:
        return email.utils.parsedate_to_datetime(text).astimezone(dt.UTC)
    except (ValueError, TypeError):
        raise MetadataResponseError(f"NotBefore is not a date: {snippet(text)}",
                                    provider=P) from None


def _event(raw: object, index: int) -> dict[str, Any]:
    what = f"event {index}"
    if not isinstance(raw, dict):
        raise MetadataResponseError(f"{what} is not an object: {snippet(raw)}", provider=P)
    event_id = field_of(raw, "EventId", str, P, what=what)
    if not _ID_RE.match(event_id):
        raise MetadataResponseError(f"{what}: bad EventId {snippet(event_id)}", provider=P)
    for name in ("EventType", "ResourceType"):
        if not _WORD_RE.match(field_of(raw, name, str, P, what=what)):
            raise MetadataResponseError(f"{what}: bad {name} {snippet(raw[name])}", provider=P)
    resources = field_of(raw, "Resources", list, P, what=what)
    if len(resources) > MAX_RESOURCES:
        raise MetadataResponseError(f"{what}: {len(resources)} resources "
                                    f"(at most {MAX_RESOURCES})", provider=P)
    for r in resources:
        if not isinstance(r, str) or not 0 < len(r) <= MAX_NAME_CHARS:
            raise MetadataResponseError(f"{what}: bad resource {snippet(r)}", provider=P)
    status = field_of(raw, "EventStatus", str, P, what=what)
    if status not in STATUSES:
        raise MetadataResponseError(f"{what}: bad EventStatus {snippet(status)}", provider=P)
    field_of(raw, "NotBefore", str, P, what=what)
    for name, kind in (("Description", str), ("EventSource", str), ("DurationInSeconds", int)):
        if name in raw:
            field_of(raw, name, kind, P, what=what)
    return raw


def parse_events(response: Response, vm_name: str, now: dt.datetime
                 ) -> tuple[int, list[Notice]]:
    """(DocumentIncarnation, the notices for ``vm_name``) of a Scheduled Events document.

    The whole document is checked; one bad event refuses it all (a half-read document
    could hide the one that matters)."""
    if response.status != 200:
        raise unexpected_status(response, P, what="scheduledevents")
    doc = json_object(response, P, what="scheduledevents", max_bytes=MAX_BODY_BYTES)
    incarnation = field_of(doc, "DocumentIncarnation", int, P, what="scheduledevents")
    if incarnation < 0:
        raise MetadataResponseError(f"scheduledevents: DocumentIncarnation {incarnation} < 0",
                                    provider=P)
    events = field_of(doc, "Events", list, P, what="scheduledevents")
    if len(events) > MAX_EVENTS:
        raise MetadataResponseError(f"scheduledevents: {len(events)} events "
                                    f"(at most {MAX_EVENTS})", provider=P)
    checked = [_event(raw, i) for i, raw in enumerate(events)]
    notices = []
    for e in checked:
        if e["EventType"] not in EVICTIONS or vm_name not in e["Resources"]:
            continue
        when = parse_not_before(e["NotBefore"])
        if when is None and e["EventStatus"] != "Started":
            raise MetadataResponseError(f"event {e['EventId']}: Scheduled without NotBefore",
                                        provider=P)
        deadline = now if when is None else check_deadline(
            when, now, P, what=f"event {e['EventId']} NotBefore")
        notices.append(Notice(Provider.AZURE, EVICTIONS[e["EventType"]], deadline, now,
                              key=e["EventId"], details=e))
    return incarnation, notices


def start_request(event_ids: list[str]) -> bytes:
    """The body that acknowledges (starts) ``event_ids``."""
    return json.dumps({"StartRequests": [{"EventId": i} for i in event_ids]}).encode()


class AzureCore:
    """This VM's name (unless given), then a Scheduled Events poll every second."""

    provider = Provider.AZURE

    def __init__(self, *, vm_name: str | None = None,
                 poll_interval_s: float = POLL_INTERVAL_S) -> None:
        if vm_name is not None and not _NAME_RE.match(vm_name):
            raise MetadataResponseError(f"not a VM name: {snippet(vm_name)}", provider=P)
        self.vm_name = vm_name
        self.poll_interval_s = poll_interval_s
        self.incarnation: int | None = None
        self._wait_s = 0.0

    def next_request(self, now: dt.datetime) -> Request:
        headers = {METADATA_HEADER: "true"}
        if self.vm_name is None:
            return Request("GET", NAME_PATH, headers, max_body_bytes=4096)
        return Request("GET", EVENTS_PATH, headers, max_body_bytes=MAX_BODY_BYTES,
                       timeout_s=FIRST_TIMEOUT_S if self.incarnation is None else 10.0)

    def receive(self, request: Request, response: Response, now: dt.datetime) -> list[Notice]:
        if request.method == "POST":
            if response.status != 200:
                raise unexpected_status(response, P, what="StartRequests")
            return []
        if request.path == NAME_PATH:
            self.vm_name = parse_vm_name(response)
            self._wait_s = 0.0
            return []
        assert self.vm_name is not None
        self.incarnation, notices = parse_events(response, self.vm_name, now)
        self._wait_s = self.poll_interval_s
        return notices

    def wait_s(self) -> float:
        return self._wait_s

    def failed(self) -> None:
        """Nothing to forget: the next poll reads the whole document again."""

    def acknowledge(self, notice: Notice) -> Request | None:
        return Request("POST", EVENTS_PATH, {METADATA_HEADER: "true",
                                             "Content-Type": "application/json"},
                       body=start_request([notice.key]), max_body_bytes=4096)
