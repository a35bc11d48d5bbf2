"""After the migration: the two clocks compared, and the destination's report sent back.

Once the migrator and the receiver are done (the last CompletedAck), the
connection carries launch frames again (:mod:`ferry.live.launch`: ``b"FLX1"``,
u32 length, one JSON object). The source leads, so nothing the destination
sends can be read by the migration codec by mistake::

    source                                        destination
    CLOCK_PROBE   {"clock_probe": t1}         ->                  t2 = on arrival
                                              <-  CLOCK_REPLY {"clock_reply": [t1, t2, t3]}
    ... CLOCK_PROBES times (at most MAX_CLOCK_PROBES) ...
    REPORT_REQUEST {"report_request": true}   ->
                                              <-  REPORT {"report": {DestinationReport}}

``t1`` and the arrival of each reply (``t4``) are on the source's
CLOCK_MONOTONIC, ``t2`` and ``t3`` on the destination's; the source turns the
samples into a clock offset with its uncertainty (:mod:`ferry.live.clock`).
Every frame is decoded into a typed message and checked (sizes, types,
finite numbers, the echoed ``t1``) before use; anything else is a
RemoteProtocolError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ferry.errors import RemoteProtocolError
from ferry.live import checks, launch
from ferry.live.clock import ClockOffset, ClockSample, ClockSampleError, estimate
from ferry.live.report import DestinationReport
from ferry.live.timeline import Clock
from ferry.transport.base import Stream

CLOCK_PROBES = 4
"""Round trips the source makes; the quickest bounds the offset best."""
MAX_CLOCK_PROBES = 16
REPORT_TIMEOUT_S = 10.0
"""How long either side waits for the other's next frame (the report is built
already; anything slower is a gone peer)."""


@dataclass(frozen=True, slots=True)
class ClockProbe:
    sent_s: float


@dataclass(frozen=True, slots=True)
class ClockReply:
    sent_s: float
    received_s: float
    replied_s: float


@dataclass(frozen=True, slots=True)
class ReportRequest:
    pass


@dataclass(frozen=True, slots=True)
class Report:
    report: DestinationReport


Message = ClockProbe | ClockReply | ReportRequest | Report


def encode(msg: Message) -> dict[str, Any]:
    match msg:
        case ClockProbe():
            return {"clock_probe": msg.sent_s}
        case ClockReply():
            return {"clock_reply": [msg.sent_s, msg.received_s, msg.replied_s]}
        case ReportRequest():
            return {"report_request": True}
        case Report():
            return {"report": msg.report.to_json()}


def _stamp(value: object) -> float:
    try:
        return checks.finite(value, "a clock stamp")
    except ValueError as exc:
        raise RemoteProtocolError(str(exc)) from None


def decode(frame: dict[str, Any]) -> Message:
    """One frame of the exchange as a typed message (RemoteProtocolError otherwise)."""
    if len(frame) != 1:
        raise RemoteProtocolError(f"a report-exchange frame has one key, not {len(frame)}")
    [(key, value)] = frame.items()
    match key:
        case "clock_probe":
            return ClockProbe(_stamp(value))
        case "clock_reply":
            if not isinstance(value, list) or len(value) != 3:
                raise RemoteProtocolError("clock_reply is [t1, t2, t3]")
            return ClockReply(*(_stamp(v) for v in value))
        case "report_request" if value is True:
            return ReportRequest()
        case "report":
            return Report(DestinationReport.from_json(value))
    raise RemoteProtocolError(f"unexpected report-exchange frame {key!r:.40}")


async def _receive(stream: Stream) -> Message:
    return decode(await launch.receive_frame(stream, idle_timeout_s=REPORT_TIMEOUT_S))


async def _send(stream: Stream, msg: Message) -> None:
    await launch.send_frame(stream, encode(msg))


async def fetch_report(stream: Stream, *, probes: int = CLOCK_PROBES,
                       clock: Clock = time.monotonic) -> tuple[DestinationReport, ClockOffset]:
    """Source: compare clocks with the destination, then ask for its report.

    Raises RemoteProtocolError, DeadlineError or BrokenResourceError; the
    migration itself is over by then, so callers log these and go on.
    """
    if not 1 <= probes <= MAX_CLOCK_PROBES:
        raise ValueError(f"probes must be in [1, {MAX_CLOCK_PROBES}]")
    samples = []
    for _ in range(probes):
        sent = clock()
        await _send(stream, ClockProbe(sent))
        reply = await _receive(stream)
        answered = clock()
        if not isinstance(reply, ClockReply) or reply.sent_s != sent:
            raise RemoteProtocolError("the destination did not answer the clock probe")
        try:
            samples.append(ClockSample(sent, reply.received_s, reply.replied_s, answered))
        except ClockSampleError as exc:
            raise RemoteProtocolError(f"impossible clock reply: {exc}") from exc
    await _send(stream, ReportRequest())
    answer = await _receive(stream)
    if not isinstance(answer, Report):
        raise RemoteProtocolError(f"expected the report, got {type(answer).__name__}")
    return answer.report, estimate(samples)


async def serve_report(stream: Stream, report: DestinationReport, *,
                       clock: Clock = time.monotonic) -> None:
    """Destination: answer the source's clock probes, then send ``report`` when asked."""
    probes = 0
    while True:
        msg = await _receive(stream)
        received = clock()
        match msg:
            case ClockProbe() if probes < MAX_CLOCK_PROBES:
                probes += 1
                await _send(stream, ClockReply(msg.sent_s, received, clock()))
            case ClockProbe():
                raise RemoteProtocolError(f"more than {MAX_CLOCK_PROBES} clock probes")
            case ReportRequest():
                await _send(stream, Report(report))
                return
            case _:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the source")
