"""The spot watchers end to end: ``ferry node watch-spot`` inside a namespace of its own,
talking to an emulated metadata service at 169.254.169.254:80 there, exactly as it would
in a cloud (no URL given, ``--provider auto``).

For each provider in turn: the CLI finds which service answers, survives hostile answers
(a huge body, a captive portal saying ``TRUE``, a million Azure events) with one error
line each and no notice, then prints exactly one notice for an injected event. Then
``ferry daemon --spot-watch auto`` there publishes a notice on its event stream. No VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferry.daemon.client import DaemonClient
from ferry.net import netns
from ferry.spot import Provider
from ferry.testing.metadata import emulator_in, metadata_namespace


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"ferry-spotprobe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return ok


pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not _netns_usable(), reason="needs root and `ip netns`")]

LINE_TIMEOUT_S = 60.0
"""Generous: the CLI's start-up on a loaded 2-core machine takes seconds."""

HOSTILE: dict[Provider, tuple[int, bytes, dict[str, str]]] = {
    # A body of 1 MiB where 50 bytes are expected.
    Provider.AWS: (200, b'{"action": "terminate", "time": "' + b"9" * (1 << 20) + b'"}', {}),
    # Something else answering for 169.254.169.254 (a proxy, a captive portal): TRUE
    # without Metadata-Flavor must not be taken for a preemption.
    Provider.GCP: (200, b"TRUE", {"ETag": "0123456789abcdef"}),
    # A million events (3 MB): refused unread past 256 KiB.
    Provider.AZURE: (200, b'{"DocumentIncarnation": 9, "Events": ['
                     + b",".join([b"{}"] * 10**6) + b"]}", {}),
}


class WatchProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(LINE_TIMEOUT_S):
            raw = await self.proc.stdout.readline()
        assert raw, f"watch-spot exited ({await self.proc.wait()})"
        record: dict[str, Any] = json.loads(raw)
        return record


@contextlib.asynccontextmanager
async def watch_spot(namespace: str, *extra: str) -> AsyncIterator[WatchProcess]:
    argv = netns.netns_exec_argv(namespace, [
        sys.executable, "-m", "ferry.cli.main", "node", "watch-spot", "--provider", "auto",
        "--poll-interval-s", "0.2", "--json", *extra])
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        yield WatchProcess(proc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_watch_spot_in_a_namespace_finds_each_providers_notice_once() -> None:
    # One namespace per case, all at once: the CLI's start-up is most of the time.
    tag = uuid.uuid4().hex[:8]

    async def in_namespace(name: str, case: Callable[[str], Awaitable[None]]) -> None:
        # The daemon's namespace starts without the address: its emulator adds it.
        async with metadata_namespace(f"{tag}-{name}", link_local=name != "daemon") as ns:
            assert "spot" in ns
            await case(ns)

    async with asyncio.TaskGroup() as tg:
        for provider in Provider:
            tg.create_task(in_namespace(provider.value, functools.partial(
                _one_provider, provider=provider)))
        tg.create_task(in_namespace("daemon", _daemon))


async def _one_provider(ns: str, *, provider: Provider) -> None:
    extra = {Provider.AZURE: ["--ack"], Provider.GCP: ["--once"]}.get(provider, [])
    # (AWS: add_address where the address is already, which must not fail)
    async with emulator_in(ns, [provider], vm_name="spot-node-1",
                           add_address=provider is Provider.AWS) as emulator, \
            watch_spot(ns, *extra) as w:
        assert await w.line() == {"kind": "watching", "provider": provider.value,
                                  "url": "http://169.254.169.254"}
        status, body, headers = HOSTILE[provider]
        emulator.serve_raw(provider, status, body, headers=headers, times=2)
        errors = [await w.line(), await w.line()]
        assert [e["kind"] for e in errors] == ["error", "error"], errors
        assert all(e["type"] == "MetadataResponseError" for e in errors), errors
        assert all(len(e["error"]) < 300 for e in errors)
        if provider is Provider.AZURE:  # another VM's eviction is not ours
            emulator.inject(provider, resources=["spot-node-2"])
        key = emulator.inject(provider)
        notice = await w.line()
        assert notice["kind"] == "notice", notice
        assert notice["provider"] == provider.value
        assert key in notice["key"]
        assert 0 < notice["window_s"] <= 121
        if provider is Provider.AZURE:
            assert notice["details"]["Resources"] == ["spot-node-1"]
            await _until(lambda: emulator.acknowledged == [key])
        if provider is Provider.GCP:  # --once: done at the first notice
            assert await w.proc.wait() == 0
            return
        # The event stays announced; polls go on; no second notice comes.
        asked = sum(emulator.requests.values())
        await _until(lambda: sum(emulator.requests.values()) >= asked + 2)
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.stdout is not None
        rest = await w.proc.stdout.read()
        assert b'"kind": "notice"' not in rest
        assert await w.proc.wait() == 143


async def _daemon(ns: str) -> None:
    """``ferry daemon --spot-watch auto`` in the namespace, the emulator there as its own
    process (``python -m ferry.testing.metadata``, as a demo runs it) told through its
    control socket: a GCP notice is a ``spot.notice`` event and counts in the metrics."""
    root = Path(tempfile.mkdtemp(prefix="fspot-"))
    sock, control = root / "d.sock", root / "metadata.sock"
    env = {**os.environ, "FERRY_RUN_DIR": str(root / "run"),
           "FERRY_STATE_DIR": str(root / "state")}
    procs: list[asyncio.subprocess.Process] = []

    async def start(argv: list[str], ready: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            *netns.netns_exec_argv(ns, argv), env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        procs.append(proc)
        assert proc.stdout is not None
        async with asyncio.timeout(LINE_TIMEOUT_S):
            line: dict[str, Any] = json.loads(await proc.stdout.readline())
        assert ready in line, line
        return line

    try:
        await start([sys.executable, "-m", "ferry.testing.metadata", "--providers", "gcp",
                     "--add-address", "--control", str(control)], "ready")
        await start([sys.executable, "-m", "ferry.cli.main", "daemon", "--json", "--socket",
                     str(sock), "--warm-holders", "0", "--spot-watch", "auto"], "event")
        client = DaemonClient.unix(sock)
        injector = httpx.Client(transport=httpx.HTTPTransport(uds=str(control)),
                                base_url="http://emulator")

        def follow() -> dict[str, Any]:
            for event in client.events(timeout_s=LINE_TIMEOUT_S):
                if event["kind"] == "subscribed":  # following: what comes now is seen
                    injector.post("/inject/gcp").raise_for_status()
                if event["kind"] == "spot.notice":
                    assert injector.get("/state").json()["gcp"] == {"preempted": True}
                    return event
            raise AssertionError("the daemon's event stream ended")

        with injector:
            event = await asyncio.to_thread(follow)
        assert event["notice"]["provider"] == "gcp"
        assert event["notice"]["action"] == "preempt"
        _, metrics = await asyncio.to_thread(client.raw, "GET", "/metrics")
        assert b'ferry_spot_notices_total{action="preempt",provider="gcp"} 1.0' in metrics
        await _terminate(procs)
        # The emulator ends cleanly on SIGTERM and takes its control socket with it.
        assert procs[0].returncode == 0
        assert not control.exists()
    finally:
        await _terminate(procs)
        shutil.rmtree(root, ignore_errors=True)


async def _terminate(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in reversed(procs):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _until(done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not done():  # noqa: ASYNC110 (the emulator's counters have no event)
            await asyncio.sleep(0.05)
