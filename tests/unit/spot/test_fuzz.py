"""Whatever a metadata service answers, a parser returns notices or raises
MetadataResponseError with a one-line message: never another exception."""

from __future__ import annotations

import datetime as dt
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.spot import aws, azure, gcp
from ferry.spot.errors import MetadataResponseError
from ferry.spot.messages import Response

NOW = dt.datetime(2026, 12, 3, 16, 0, 0, tzinfo=dt.UTC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=5),
    max_leaves=30)
event_like = st.fixed_dictionaries({}, optional={
    "EventId": st.text(max_size=70) | json_values,
    "EventType": st.sampled_from(["Preempt", "Terminate", "Freeze", ""]) | json_values,
    "ResourceType": st.just("VirtualMachine") | json_values,
    "Resources": st.lists(st.sampled_from(["node-1", "node-2", ""]), max_size=3) | json_values,
    "EventStatus": st.sampled_from(["Scheduled", "Started", "x"]) | json_values,
    "NotBefore": st.sampled_from(["", "Thu, 03 Dec 2026 16:00:30 GMT",
                                  "Thu, 03 Dec 2026 99:00:30 GMT"]) | json_values,
    "DurationInSeconds": st.integers() | json_values,
})
bodies = (st.binary(max_size=300)
          | json_values.map(lambda v: json.dumps(v).encode())
          | st.fixed_dictionaries({"action": st.sampled_from(["terminate", "stop", 1]),
                                   "time": st.text(max_size=30)}).map(
              lambda v: json.dumps(v).encode())
          | st.fixed_dictionaries({"DocumentIncarnation": st.integers() | json_values,
                                   "Events": st.lists(event_like, max_size=4) | json_values}
                                  ).map(lambda v: json.dumps(v).encode()))
statuses = st.sampled_from([200, 200, 200, 401, 404, 500])
headers = st.dictionaries(st.sampled_from(["metadata-flavor", "etag", "content-type"]),
                          st.text(max_size=20), max_size=3)


def _one_line(exc: MetadataResponseError) -> None:
    assert "\n" not in str(exc)
    assert len(str(exc)) < 400


@settings(max_examples=100, deadline=None)
@given(statuses, headers, bodies)
def test_every_parser_accepts_or_raises_its_own_error(status: int, hdrs: dict[str, str],
                                                      body: bytes) -> None:
    response = Response(status, hdrs, body)
    for parse in (lambda: aws.parse_instance_action(response, NOW),
                  lambda: aws.parse_token(response),
                  lambda: gcp.parse_preempted(response),
                  lambda: azure.parse_events(response, "node-1", NOW),
                  lambda: azure.parse_vm_name(response)):
        try:
            parse()
        except MetadataResponseError as exc:
            _one_line(exc)


@settings(max_examples=60, deadline=None)
@given(st.lists(event_like, max_size=6))
def test_azure_notices_are_this_vms_evictions_within_the_horizon(events: list[object]) -> None:
    body = json.dumps({"DocumentIncarnation": 1, "Events": events}).encode()
    try:
        _, notices = azure.parse_events(Response(200, {}, body), "node-1", NOW)
    except MetadataResponseError:
        return
    for n in notices:
        assert n.details["EventType"] in ("Preempt", "Terminate")
        assert "node-1" in n.details["Resources"]
        assert NOW <= n.deadline <= NOW + dt.timedelta(hours=1)
