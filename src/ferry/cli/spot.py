"""``ferry node watch-spot``: print this machine's spot and preemption notices (docs/spot.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import Any

from rich.console import Console

from ferry.cli.args import positive_float
from ferry.cli.exitcodes import ExitCode
from ferry.errors import ConfigError

PROVIDERS = ["auto", "aws", "gcp", "azure"]


def add_watch_parser(node_sub: Any, add_common: Callable[[argparse.ArgumentParser], None]
                     ) -> None:
    c = node_sub.add_parser("watch-spot", help="watch the provider's metadata service and "
                                               "print each spot or preemption notice")
    c.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="whose metadata service (default auto: the one that answers)")
    c.add_argument("--metadata-url", default=None, metavar="URL",
                   help="where it answers (default http://169.254.169.254)")
    c.add_argument("--vm-name", help="Azure: this VM's name in Scheduled Events "
                                     "(default: asked from the metadata service)")
    c.add_argument("--poll-interval-s", type=positive_float,
                   help="AWS and Azure: seconds between polls (default 5 and 1)")
    c.add_argument("--once", action="store_true", help="exit after the first notice")
    c.add_argument("--ack", action="store_true",
                   help="Azure: acknowledge each notice at once (Azure may then act at once)")
    add_common(c)


def _emit(args: argparse.Namespace, console: Console, record: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(record), flush=True)
    else:
        console.print(text)


async def watch_spot(args: argparse.Namespace, console: Console) -> ExitCode:
    """Print each notice as it comes (one JSON object per line with --json); Ctrl-C ends."""
    from ferry.aio import cancel_and_wait
    from ferry.spot import METADATA_URL, Notice, SpotError, watcher_for

    url = args.metadata_url or METADATA_URL
    watcher = await watcher_for(args.provider, base_url=url, vm_name=args.vm_name,
                                poll_interval_s=args.poll_interval_s)
    _emit(args, console, {"kind": "watching", "provider": watcher.provider.value, "url": url},
          f"watching {watcher.provider.value} notices at {url}")
    notices: asyncio.Queue[Notice] = asyncio.Queue()

    def error(exc: SpotError) -> None:
        if args.json:  # in text mode the watcher's log line says it
            print(json.dumps({"kind": "error", "error": str(exc),
                              "type": type(exc).__name__}), flush=True)

    task = asyncio.create_task(watcher.run(notices.put_nowait, error), name="spot watch")
    try:
        while True:
            get = asyncio.ensure_future(notices.get())
            await asyncio.wait([get, task], return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                await cancel_and_wait(get)
                await task  # the watch ended: its error says why
                raise ConfigError("the watch ended")
            notice = get.result()
            _emit(args, console, {"kind": "notice", **notice.to_json()},
                  f"notice: {notice.provider} {notice.action} at {notice.deadline.isoformat()} "
                  f"({notice.seconds_left():.0f} s left; event {notice.key})")
            if args.ack:
                await watcher.acknowledge(notice)
            if args.once:
                return ExitCode.OK
    finally:
        await cancel_and_wait(task, swallow_errors=True)


async def run(args: argparse.Namespace, console: Console) -> ExitCode:
    if args.node_command == "watch-spot":
        return await watch_spot(args, console)
    raise ConfigError(f"unknown command node {args.node_command}")
