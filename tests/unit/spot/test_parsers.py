"""The providers' parsers and conversations, fed good, malformed and hostile answers."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from ferry.spot import aws, azure, gcp
from ferry.spot.errors import MetadataResponseError
from ferry.spot.messages import MAX_HORIZON_S, PAST_SLACK_S, Request, Response
from ferry.spot.notice import Action, Provider

NOW = dt.datetime(2026, 12, 3, 16, 0, 0, tzinfo=dt.UTC)
FLAVOR = {"metadata-flavor": "Google", "etag": "0123abcd"}


def aws_time(offset_s: float) -> str:
    return (NOW + dt.timedelta(seconds=offset_s)).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc1123(offset_s: float) -> str:
    return (NOW + dt.timedelta(seconds=offset_s)).strftime("%a, %d %b %Y %H:%M:%S GMT")


def azure_event(**over: object) -> dict[str, object]:
    event: dict[str, object] = {
        "EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
        "ResourceType": "VirtualMachine", "Resources": ["node-1"],
        "EventStatus": "Scheduled", "NotBefore": rfc1123(30), "Description": "",
        "EventSource": "Platform", "DurationInSeconds": -1}
    event.update(over)
    return event


def azure_doc(*events: object, incarnation: object = 3) -> Response:
    return Response(200, {}, json.dumps({"DocumentIncarnation": incarnation,
                                         "Events": list(events)}).encode())


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    assert len(text) < 300
    return text


# -- AWS ------------------------------------------------------------------------------------


def test_aws_instance_action_is_a_notice_with_its_time() -> None:
    body = json.dumps({"action": "stop", "time": aws_time(120)}).encode()
    notice = aws.parse_instance_action(Response(200, {}, body), NOW)
    assert notice is not None
    assert notice.provider is Provider.AWS
    assert notice.action is Action.STOP
    assert notice.deadline == NOW + dt.timedelta(seconds=120)
    assert notice.window_s == 120
    assert notice.details["action"] == "stop"


def test_aws_404_is_no_notice() -> None:
    assert aws.parse_instance_action(Response(404, {}, b"Not Found"), NOW) is None


@pytest.mark.parametrize(("body", "words"), [
    (b"{", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"action": "terminate"}', "no 'time'"),
    (b'{"action": 7, "time": "2026-12-03T16:02:00Z"}', "not a str"),
    (b'{"action": "explode", "time": "2026-12-03T16:02:00Z"}', "unknown action"),
    (b'{"action": "stop", "time": "tomorrow"}', "not ISO 8601"),
    (b'{"action": "stop", "time": "2026-13-45T16:02:00Z"}', "not a date"),
    (b'{"action": "stop", "time": NaN}', "not JSON"),
    (b'\xff\xfe', "not UTF-8"),
    (b"[" * 1000 + b"]" * 1000, "nests deeper"),
    (b'{"action": "stop", "time": "2026-12-03T16:02:00Z", "pad": "' + b"x" * 5000 + b'"}',
     "body of"),
])
def test_aws_malformed_instance_action_is_refused(body: bytes, words: str) -> None:
    with pytest.raises(MetadataResponseError, match=words) as caught:
        aws.parse_instance_action(Response(200, {}, body), NOW)
    assert one_line(caught.value).startswith("aws: ")


@pytest.mark.parametrize("offset_s", [-PAST_SLACK_S - 1, MAX_HORIZON_S + 1, -86400 * 365,
                                      86400 * 365 * 100])
def test_aws_times_in_the_past_or_far_future_are_refused(offset_s: float) -> None:
    body = json.dumps({"action": "terminate", "time": aws_time(offset_s)}).encode()
    with pytest.raises(MetadataResponseError, match=r"in the past|ahead"):
        aws.parse_instance_action(Response(200, {}, body), NOW)


def test_aws_a_little_late_is_now() -> None:
    body = json.dumps({"action": "terminate", "time": aws_time(-10)}).encode()
    notice = aws.parse_instance_action(Response(200, {}, body), NOW)
    assert notice is not None
    assert notice.deadline == NOW


@pytest.mark.parametrize("body", [b"", b"has space", b"x" * 2000, b"tok\x00en", "tökén".encode()])
def test_aws_bad_tokens_are_refused(body: bytes) -> None:
    with pytest.raises(MetadataResponseError):
        aws.parse_token(Response(200, {}, body))


def test_aws_conversation_token_then_polls_and_a_new_token_after_401() -> None:
    core = aws.AwsCore(poll_interval_s=5.0)
    put = core.next_request(NOW)
    assert (put.method, put.path) == ("PUT", aws.TOKEN_PATH)
    assert put.headers[aws.TTL_HEADER] == "21600"
    assert core.receive(put, Response(200, {}, b"AQAEAtoken=="), NOW) == []
    assert core.wait_s() == 0
    get = core.next_request(NOW)
    assert (get.method, get.path) == ("GET", aws.ACTION_PATH)
    assert get.headers[aws.TOKEN_HEADER] == "AQAEAtoken=="
    assert core.receive(get, Response(404), NOW) == []
    assert core.wait_s() == 5.0
    assert core.receive(get, Response(401), NOW) == []
    assert core.wait_s() == 0
    assert core.next_request(NOW).path == aws.TOKEN_PATH
    # And the token is renewed before it expires, unasked.
    core.receive(put, Response(200, {}, b"second"), NOW)
    assert core.next_request(NOW + dt.timedelta(seconds=21600 - 299)).path == aws.TOKEN_PATH


# -- GCP ------------------------------------------------------------------------------------


def test_gcp_conversation_plain_get_then_hanging_gets_with_the_etag() -> None:
    core = gcp.GcpCore(hang_s=60)
    first = core.next_request(NOW)
    assert first.path == gcp.PATH
    assert first.headers["Metadata-Flavor"] == "Google"
    assert core.receive(first, Response(200, FLAVOR, b"FALSE"), NOW) == []
    hang = core.next_request(NOW)
    assert hang.path == f"{gcp.PATH}?wait_for_change=true&last_etag=0123abcd&timeout_sec=60"
    assert hang.timeout_s > 60
    changed = {**FLAVOR, "etag": "feed"}
    [notice] = core.receive(hang, Response(200, changed, b"TRUE", elapsed_s=12.0), NOW)
    assert notice.action is Action.PREEMPT
    assert notice.deadline == NOW + dt.timedelta(seconds=30)
    assert "last_etag=feed" in core.next_request(NOW).path


def test_gcp_a_hanging_get_that_does_not_hang_does_not_spin() -> None:
    core = gcp.GcpCore(hang_s=60)
    core.receive(core.next_request(NOW), Response(200, FLAVOR, b"FALSE"), NOW)
    hang = core.next_request(NOW)
    core.receive(hang, Response(200, FLAVOR, b"FALSE", elapsed_s=0.001), NOW)
    assert core.wait_s() == gcp.UNHONOURED_WAIT_S
    core.receive(hang, Response(200, FLAVOR, b"FALSE", elapsed_s=60.0), NOW)
    assert core.wait_s() == 0


@pytest.mark.parametrize(("status", "headers", "body", "words"), [
    (200, {"etag": "ab"}, b"TRUE", "Metadata-Flavor"),
    (200, {"metadata-flavor": "Amazon", "etag": "ab"}, b"TRUE", "Metadata-Flavor"),
    (200, {"metadata-flavor": "Google"}, b"TRUE", "ETag"),
    (200, {"metadata-flavor": "Google", "etag": "a b"}, b"TRUE", "ETag"),
    (200, FLAVOR, b"true", "neither"),
    (200, FLAVOR, b"TRUE FALSE", "neither"),
    (200, FLAVOR, b"\x80", "not ASCII"),
    (200, FLAVOR, b"TR\x1bUE", "control"),
    (503, FLAVOR, b"busy", "HTTP 503"),
])
def test_gcp_malformed_answers_are_refused(status: int, headers: dict[str, str], body: bytes,
                                           words: str) -> None:
    with pytest.raises(MetadataResponseError, match=words) as caught:
        gcp.parse_preempted(Response(status, headers, body))
    one_line(caught.value)


# -- Azure ----------------------------------------------------------------------------------


def test_azure_preempt_for_this_vm_is_a_notice() -> None:
    incarnation, [notice] = azure.parse_events(azure_doc(azure_event()), "node-1", NOW)
    assert incarnation == 3
    assert notice.provider is Provider.AZURE
    assert notice.action is Action.PREEMPT
    assert notice.key == "602d9444-d2cd-49c7-8624-8643e7171297"
    assert notice.deadline == NOW + dt.timedelta(seconds=30)


def test_azure_only_this_vms_evictions_count() -> None:
    doc = azure_doc(azure_event(Resources=["node-2"]),
                    azure_event(EventId="b", EventType="Freeze"),
                    azure_event(EventId="c", EventType="Reboot", NotBefore=rfc1123(600)),
                    azure_event(EventId="d", EventType="Terminate", NotBefore=rfc1123(300)))
    _, notices = azure.parse_events(doc, "node-1", NOW)
    assert [(n.key, n.action) for n in notices] == [("d", Action.TERMINATE)]


def test_azure_started_event_has_no_not_before_and_is_due_now() -> None:
    doc = azure_doc(azure_event(EventStatus="Started", NotBefore=""))
    _, [notice] = azure.parse_events(doc, "node-1", NOW)
    assert notice.deadline == NOW


@pytest.mark.parametrize(("response", "words"), [
    (Response(200, {}, b'{"Events": []}'), "DocumentIncarnation"),
    (azure_doc(incarnation="3"), "not a int"),
    (azure_doc(incarnation=True), "not a int"),
    (azure_doc(incarnation=-1), "< 0"),
    (Response(200, {}, b'{"DocumentIncarnation": 1, "Events": {}}'), "not a list"),
    (azure_doc(*[azure_event(EventId=str(i)) for i in range(101)]), "101 events"),
    (azure_doc(7), "not an object"),
    (azure_doc(azure_event(EventId="../../etc")), "bad EventId"),
    (azure_doc(azure_event(EventType="Pre empt")), "bad EventType"),
    (azure_doc(azure_event(Resources="node-1")), "not a list"),
    (azure_doc(azure_event(Resources=["node-1", 5])), "bad resource"),
    (azure_doc(azure_event(Resources=["n"] * 1001)), "1001 resources"),
    (azure_doc(azure_event(EventStatus="Done")), "bad EventStatus"),
    (azure_doc(azure_event(NotBefore="2026-12-03T16:00:30Z")), "RFC 1123"),
    (azure_doc(azure_event(NotBefore="Thu, 31 Feb 2026 16:00:30 GMT")), "not a date"),
    (azure_doc(azure_event(NotBefore="")), "without NotBefore"),
    (azure_doc(azure_event(NotBefore=rfc1123(-3600))), "in the past"),
    (azure_doc(azure_event(NotBefore=rfc1123(86400 * 30))), "ahead"),
    (azure_doc(azure_event(DurationInSeconds="forever")), "not a int"),
    (Response(400, {}, b'{"error": "Bad request"}'), "HTTP 400"),
])
def test_azure_malformed_documents_are_refused(response: Response, words: str) -> None:
    with pytest.raises(MetadataResponseError, match=words) as caught:
        azure.parse_events(response, "node-1", NOW)
    one_line(caught.value)


def test_azure_a_million_events_is_one_error_not_a_million_notices() -> None:
    event = json.dumps(azure_event(EventId="e"))
    body = ('{"DocumentIncarnation": 1, "Events": [' + ", ".join([event] * 10**6)
            + "]}").encode()
    with pytest.raises(MetadataResponseError, match=r"body of .* bytes") as caught:
        azure.parse_events(Response(200, {}, body), "node-1", NOW)
    one_line(caught.value)
    # Small events under the size cap: refused by their count, before any is looked at.
    tiny = b'{"DocumentIncarnation": 1, "Events": [' + b",".join([b"0"] * 50000) + b"]}"
    assert len(tiny) < azure.MAX_BODY_BYTES
    with pytest.raises(MetadataResponseError, match="50000 events"):
        azure.parse_events(Response(200, {}, tiny), "node-1", NOW)


def test_azure_conversation_name_then_events_then_acknowledge() -> None:
    core = azure.AzureCore()
    name = core.next_request(NOW)
    assert name.path == azure.NAME_PATH
    assert name.headers["Metadata"] == "true"
    core.receive(name, Response(200, {}, b"node-1\n"), NOW)
    assert core.vm_name == "node-1"
    poll = core.next_request(NOW)
    assert poll.path == "/metadata/scheduledevents?api-version=2020-07-01"
    [notice] = core.receive(poll, azure_doc(azure_event()), NOW)
    assert core.wait_s() == azure.POLL_INTERVAL_S
    ack = core.acknowledge(notice)
    assert ack is not None
    assert ack.method == "POST"
    assert ack.path == poll.path
    assert json.loads(ack.body) == {"StartRequests": [{"EventId": notice.key}]}
    assert core.receive(ack, Response(200), NOW) == []
    with pytest.raises(MetadataResponseError, match="StartRequests"):
        core.receive(ack, Response(400, {}, b"{}"), NOW)


@pytest.mark.parametrize("body", [b"", b"a b", b"-x", b"x" * 200, b"\xff"])
def test_azure_bad_vm_names_are_refused(body: bytes) -> None:
    with pytest.raises(MetadataResponseError):
        azure.parse_vm_name(Response(200, {}, body))


def test_requests_are_bounded() -> None:
    for core in (aws.AwsCore(), gcp.GcpCore(), azure.AzureCore(vm_name="n")):
        r: Request = core.next_request(NOW)
        assert 0 < r.max_body_bytes <= azure.MAX_BODY_BYTES
