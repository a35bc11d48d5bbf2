#!/usr/bin/env python3
"""Benchmark: how much of a provider's notice window does noticing take?

    .venv/bin/python bench/spot_notice.py --json
    .venv/bin/python bench/spot_notice.py --trials 10 --provider azure --json

For each provider, against its emulator (:mod:`ferry.testing.metadata`) on loopback, with
the watcher's default settings (AWS polls every 5 s, Azure every 1 s, GCP hangs on
``wait_for_change``): ``--trials`` times, a notice is injected at a random moment of the
poll cycle and the time until the watcher hands it on is measured (``detect_ms``: p50 and
max). In the same run, the baseline is one request's round trip to the same emulator
(``request_ms``, median of 20): ``detect_ratio`` = detect p50 / request_ms says what
polling costs over asking once. ``window_share`` = detect max / the provider's window
(:data:`ferry.spot.WINDOW_S`) is the part of the evacuation budget spent noticing.

``hostile``: a million-event Azure document (3 MB) against a normal one: the time until
the watcher has refused it (it stops reading at 256 KiB) and the time to read and parse a
one-event document; ``refuse_ratio`` is their quotient.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from ferry.spot import WINDOW_S, Notice, Provider, SpotError, watcher_for
from ferry.spot.azure import AzureCore
from ferry.spot.messages import Request
from ferry.spot.watch import client, exchange
from ferry.testing.metadata import MetadataEmulator

POLL_S = {Provider.AWS: 5.0, Provider.GCP: 1.0, Provider.AZURE: 1.0}
"""Over how long a stretch the injection moment is drawn (a poll cycle; GCP has none)."""


@contextlib.asynccontextmanager
async def emulated(provider: Provider) -> AsyncIterator[tuple[MetadataEmulator, str]]:
    emulator = MetadataEmulator([provider])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    try:
        async with emulator.serving(sock):
            yield emulator, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


async def one_trial(provider: Provider, rng: random.Random) -> float:
    async with emulated(provider) as (emulator, url):
        watcher = await watcher_for(provider, base_url=url)
        seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        def on_notice(notice: Notice) -> None:
            if not seen.done():
                seen.set_result(time.monotonic())

        task = asyncio.create_task(watcher.run(on_notice))
        try:
            while emulator.asked(NOTICE_PATH[provider]) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0, POLL_S[provider]))
            injected = time.monotonic()
            emulator.inject(provider)
            async with asyncio.timeout(60):
                return (await seen) - injected
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


NOTICE_PATH = {Provider.AWS: "/latest/meta-data/spot/instance-action",
               Provider.GCP: "/computeMetadata/v1/instance/preempted",
               Provider.AZURE: "/metadata/scheduledevents"}


async def request_ms(provider: Provider) -> float:
    async with emulated(provider) as (_, url), client(url) as http:
        request = Request("GET", "/computeMetadata/v1/instance/preempted",
                          {"Metadata-Flavor": "Google"}, max_body_bytes=64)
        times = []
        for _ in range(20):
            started = time.monotonic()
            await exchange(http, request, Provider.GCP)
            times.append(time.monotonic() - started)
    return statistics.median(times) * 1e3


async def hostile() -> dict[str, float]:
    huge = (b'{"DocumentIncarnation": 9, "Events": [' + b",".join([b"{}"] * 10**6) + b"]}")
    async with emulated(Provider.AZURE) as (emulator, url), client(url) as http:
        core = AzureCore(vm_name=emulator.vm_name)
        emulator.inject(Provider.AZURE)
        request = core.next_request(dt.datetime.now(dt.UTC))
        normal, refused = [], []
        for _ in range(10):
            started = time.monotonic()
            core.receive(request, await exchange(http, request, Provider.AZURE),
                         dt.datetime.now(dt.UTC))
            normal.append(time.monotonic() - started)
            emulator.serve_raw(Provider.AZURE, 200, huge, times=1)
            started = time.monotonic()
            try:
                await exchange(http, request, Provider.AZURE)
            except SpotError:
                refused.append(time.monotonic() - started)
            else:
                raise AssertionError("a 3 MB document was read")
    n, r = statistics.median(normal) * 1e3, statistics.median(refused) * 1e3
    return {"parse_one_event_ms": round(n, 2), "refuse_million_events_ms": round(r, 2),
            "refuse_ratio": round(r / n, 2)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    baseline = await request_ms(Provider.GCP)
    out: dict[str, Any] = {"request_ms": round(baseline, 2), "trials": args.trials,
                           "providers": {}}
    for provider in args.provider or list(Provider):
        detect = [await one_trial(provider, rng) * 1e3 for _ in range(args.trials)]
        p50, worst = statistics.median(detect), max(detect)
        out["providers"][provider.value] = {
            "window_s": WINDOW_S[provider], "poll_s": POLL_S[provider] if provider
            is not Provider.GCP else None,
            "detect_ms_p50": round(p50, 1), "detect_ms_max": round(worst, 1),
            "detect_ratio": round(p50 / baseline, 1),
            "window_share": round(worst / 1e3 / WINDOW_S[provider], 4)}
    out["hostile"] = await hostile()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--provider", type=Provider, action="append", choices=list(Provider))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the watchers' notice lines are not the output
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"one request: {result['request_ms']} ms")
        for name, r in result["providers"].items():
            print(f"{name:>5}: notice seen after {r['detect_ms_p50']} ms (p50), "
                  f"{r['detect_ms_max']} ms (max) = {100 * r['window_share']:.2f} % of its "
                  f"{r['window_s']:.0f} s window; {r['detect_ratio']}x one request")
        h = result["hostile"]
        print(f"a million Azure events refused in {h['refuse_million_events_ms']} ms, "
              f"{h['refuse_ratio']}x a one-event document ({h['parse_one_event_ms']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
