"""The control socket's codec: every op round-trips; malformed, mistyped and oversized
messages are refused with ControlProtocolError."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ferry.live.access import Access
from ferry.live.clock import ClockFigures
from ferry.live.downtime import Downtime
from ferry.live.rampath import RamPath
from ferry.live.summary import DeviceSummary, MigrationSummary
from ferry.migration.policy import Mode, StopReason
from ferry.net import PortForward
from ferry.node import control
from ferry.node.control import ControlOp, ControlProtocolError
from ferry.node.record import HolderState
from ferry.s3.mirror import MirrorStatus
from ferry.vm.stopmode import StopMode

REQUESTS: list[control.Request] = [
    control.StatusRequest(),
    control.StopRequest(),
    control.StopRequest(StopMode.SUSPEND),
    control.ExecRequest.of(["redis-cli", "dbsize"], stdin=b"\x00\xff", timeout_s=5.5),
    control.ExecRequest.of("echo $HOSTNAME"),
    control.MigrateRequest(to=("10.0.0.2", 7521), access=Access(token="ab" * 32),
                           precopy_only=True),
    control.MigrateRequest(to=("::1", 7521), access=Access(insecure=True)),
    control.MigrateRequest(to=("::1", 7521), access=Access(insecure=True), ram=RamPath.ENGINE),
    control.MigrateRequest(package=Path("/tmp/x.ferry"), key=Path("/k"), overwrite=True),
    control.MigrateCancelRequest(),
    control.ClaimRequest("w2"),
    control.ClaimRequest("w2", (PortForward("127.0.0.1", 0, 6379),)),
    control.SessionRequest.of(["sh"], tty=True, rows=24, cols=80, term="xterm-256color"),
    control.SessionRequest.of("cat > /tmp/x"),
    control.AttachRequest(),
]

REPLIES: list[control.Reply] = [
    control.StatusReply("r1", HolderState.MIGRATING, 4711, 4712, ("127.0.0.1:1->2/tcp",),
                        {"reads": 3}, {"cpu_s": 0.5}),
    control.StatusReply("r1", HolderState.MIGRATING, 4711, 4712, (), {}, {},
                        {"phase": "precopy", "bytes_sent": 4096, "cycles": 0,
                         "elapsed_s": 0.25}),
    control.StatusReply("r1", HolderState.RUNNING, 4711, 4712, (), {}, {}, None,
                        {"root": {"reads": 5, "read_bytes": 20480, "writes": 1,
                                  "write_bytes": 4096, "flushes": 1}},
                        {"agent_up": True, "agent_last_ok_s": 1.5, "agent_rtt_ms": 2.25,
                         "agent_failures": 0, "dirty_rate_mib_s": None,
                         "dirty_rate_age_s": None}),
    control.StatusReply("r1", HolderState.RUNNING, 4711, 4712,
                        mirror=MirrorStatus("s3://b/r1", state="failing", checkpoints=3,
                                            sequence=3, last_checkpoint_unix_s=1.5e9,
                                            last_pause_ms=41.5, failures=2,
                                            last_error="unreachable").to_json()),
    control.StopReply(StopMode.SUSPEND, state_bytes=72226, flush_bytes=4096),
    control.StopReply(StopMode.DISCARD),
    control.ExecReply(3, "EXITED", b"out\x00", b"err\xff"),
    control.MigrateReply(
        MigrationSummary("r1", "completed", True,
                         Downtime(12.5, 10.25, 1.5, {"pause": 0.5}, ClockFigures(3.0, 0.2, 5)),
                         mode=Mode.HYBRID, total_s=1.5, cycles=2,
                         stop_reason=StopReason.SMALL_DIRTY_SET,
                         devices={"memory": DeviceSummary(4096, {"precopy": 4096}, 1, 0)},
                         verified=True),
        {"outcome": "completed"}, None),
    control.MigrateReply(MigrationSummary("r1", "completed", True,
                                          Downtime(3.0, None, None, {}, None)),
                         {"outcome": "completed"}, {"downtime_ms": 3.0}),
    control.ExportReply("/tmp/x.ferry", "k1", 100, 0.25, 1.5, "redis"),
    control.ClaimReply({"vm_id": "w2", "pid": 7, "forwards": ["127.0.0.1:1->6379/tcp"]}),
    control.MigrateCancelReply(True),
    control.SessionReply(231),
    control.AttachReply(),
    control.MigrateCancelReply(False, "already handed off: post-copy must finish"),
    control.ErrorReply("it broke", "LiveMigrationError", handed_off=True),
    control.ErrorReply("no", "VMLifecycleError"),
]


def test_every_op_has_a_request() -> None:
    assert {r.op for r in REQUESTS} == set(ControlOp)


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_round_trip(req: control.Request) -> None:
    line = control.encode_request(req)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert control.decode_request(line) == req


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_reply_round_trip(reply: control.Reply) -> None:
    assert control.decode_reply(control.encode_reply(reply)) == reply


def test_request_fed_whole_only() -> None:
    """A line cut anywhere is not a request (the server reads whole lines)."""
    line = control.encode_request(REQUESTS[5])
    for cut in range(1, len(line) - 1):
        with pytest.raises(ControlProtocolError):
            control.decode_request(line[:cut])


BAD_REQUESTS = [
    b"not json\n",
    b"[1, 2]\n",
    b"\xff\xfe\n",
    b'{"no_op": 1}\n',
    b'{"op": "reboot"}\n',
    b'{"op": "stop", "mode": "explode"}\n',
    b'{"op": "stop", "mode": 1}\n',
    b'{"op": "exec"}\n',
    b'{"op": "exec", "argv": ["a"], "shell": "b"}\n',
    b'{"op": "exec", "argv": []}\n',
    b'{"op": "exec", "argv": "ls"}\n',
    b'{"op": "exec", "argv": [1]}\n',
    b'{"op": "exec", "shell": "x", "stdin": "***"}\n',
    b'{"op": "exec", "shell": "x", "timeout_s": "10"}\n',
    b'{"op": "exec", "shell": "x", "timeout_s": true}\n',
    b'{"op": "exec", "shell": "x", "timeout_s": -1}\n',
    b'{"op": "migrate"}\n',
    b'{"op": "migrate", "to": ["h", 1]}\n',
    b'{"op": "migrate", "to": ["h", 70000], "access": {"insecure": true}}\n',
    b'{"op": "migrate", "to": "h:1", "access": {"insecure": true}}\n',
    b'{"op": "migrate", "to": ["h", 1], "access": "token"}\n',
    b'{"op": "migrate", "to": ["h", 1], "access": {}}\n',
    b'{"op": "migrate", "to": ["h", 1], "package": "/x", "access": {"insecure": true}}\n',
    b'{"op": "migrate", "package": 5}\n',
    b'{"op": "migrate", "package": "/x", "overwrite": "yes"}\n',
    b'{"op": "claim"}\n',
    b'{"op": "claim", "vm_id": "../etc"}\n',
    b'{"op": "claim", "vm_id": "w2", "forwards": "6379"}\n',
    b'{"op": "claim", "vm_id": "w2", "forwards": [["x"]]}\n',
    b'{"op": "claim", "vm_id": "w2", "forwards": ['
    + b", ".join([b'["127.0.0.1", 0, 1, "tcp", false]'] * 65) + b']}\n',   # too many
    b'{"op": "migrate", "to": ["h", 1], "access": {"insecure": true}, "migration_id": "x"}\n',
    b'{"op": "session"}\n',
    b'{"op": "session", "argv": ["sh"], "rows": 70000}\n',
    b'{"op": "session", "argv": ["sh"], "rows": -1}\n',
    b'{"op": "session", "argv": ["sh"], "tty": 1}\n',
    b'{"op": "session", "argv": ["sh"], "term": "x\\u001b[2J"}\n',
    b'{"op": "session", "argv": ["sh"], "term": "' + b"x" * 65 + b'"}\n',
]


BAD_REPLIES = [
    b'{"op": "status"}\n',                                # no ok
    b'{"ok": "yes", "op": "status"}\n',
    b'{"ok": true}\n',                                    # no op
    b'{"ok": true, "op": "status", "vm_id": "r1"}\n',     # missing fields
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": "1"}\n',
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "dancing", "pid": 1}\n',
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 1, '
    b'"migration": {"phase": "precopy"}}\n',                 # progress fields missing
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 1, '
    b'"migration": {"phase": 1, "bytes_sent": 0, "cycles": 0, "elapsed_s": 0}}\n',
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 1, '
    b'"disk_io": {"root": {"reads": 1}}}\n',                 # counters missing
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 1, '
    b'"disk_io": [1]}\n',
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 1, '
    b'"vitals": {"agent_up": 1}}\n',
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 1, '
    b'"vitals": {"agent_up": true, "agent_last_ok_s": null, "agent_rtt_ms": null, '
    b'"agent_failures": true, "dirty_rate_mib_s": null, "dirty_rate_age_s": null}}\n',
    b'{"ok": true, "op": "status", "vm_id": "r1", "state": "running", "pid": 1, '
    b'"mirror": {"url": "s3://b/r1"}}\n',                    # mirror fields missing
    b'{"ok": true, "op": "exec", "exit_code": 0, "outcome": "E", "stdout": "!", "stderr": ""}\n',
    b'{"ok": true, "op": "migrate", "summary": [], "source": {}}\n',
    b'{"ok": true, "op": "migrate", "source": {}}\n',   # no summary
    b'{"ok": true, "op": "migrate", "summary": {"vm": 1}, "source": {}}\n',
    b'{"ok": true, "op": "migrate", "summary": {"vm": "r1", "outcome": "completed", '
    b'"handed_off": true, "mode": "sideways"}, "source": {}}\n',
    b'{"ok": true, "op": "migrate-cancel", "cancelled": 1}\n',
    b'{"ok": false}\n',
]


@pytest.mark.parametrize(("decode", "line"),
                         [(control.decode_request, line) for line in BAD_REQUESTS]
                         + [(control.decode_reply, line) for line in BAD_REPLIES])
def test_malformed_messages_are_refused(decode: Callable[[bytes], object], line: bytes) -> None:
    with pytest.raises(ControlProtocolError):
        decode(line)


def test_oversized_messages_are_refused() -> None:
    big = json.dumps({"op": "exec", "shell": "x" * control.MAX_LINE_BYTES}).encode() + b"\n"
    with pytest.raises(ControlProtocolError, match="limit"):
        control.decode_request(big)
    with pytest.raises(ControlProtocolError, match="limit"):
        control.decode_reply(big)


async def test_the_server_refuses_oversized_and_malformed_lines(tmp_path: Path) -> None:
    import asyncio
    import os

    async def handler(req: control.Request) -> control.Reply:
        return control.MigrateCancelReply(False, "idle")

    sock = tmp_path / "c.sock"
    async with control.serve_control(sock, handler):
        for line in (b"x" * (control.MAX_LINE_BYTES + 10) + b"\n", b'{"op": "reboot"}\n'):
            r, w = await asyncio.open_unix_connection(os.fspath(sock))
            w.write(line)
            await w.drain()
            reply = control.decode_reply(await r.readline())
            w.close()
            assert isinstance(reply, control.ErrorReply)
            assert reply.kind == "ControlProtocolError"
        ok = await control.ControlClient(sock).migrate_cancel()
        assert ok == control.MigrateCancelReply(False, "idle")
