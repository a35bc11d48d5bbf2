"""``ferry lab up|exec|ls|down``: hosts made of network namespaces on this machine, for
multi-host walkthroughs from a shell (:mod:`ferry.testing.lab`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from ferry.cli.exitcodes import ExitCode
from ferry.cli.output import emit_json
from ferry.errors import ConfigError


def add_parser(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("lab", help="hosts made of network namespaces, for trying "
                                   "migrations between hosts on one machine")
    lb = p.add_subparsers(dest="lab_command", required=True)
    c = lb.add_parser("up", help="create the lab's hosts on one switch")
    c.add_argument("names", nargs="+", metavar="NAME", help="host names ([a-z0-9-])")
    c.add_argument("--subnet", help="their addresses (default: the test hosts' subnet, "
                                     "ferry.testing.hosts.DEFAULT_HOST_SUBNET)")
    add_common(c)
    c = lb.add_parser("exec", help="run a command on a lab host: ferry lab exec HOST -- CMD...")
    c.add_argument("name", metavar="HOST")
    c.add_argument("argv", nargs="*", metavar="CMD")
    c.set_defaults(takes_rest=True)
    add_common(c)
    add_common(lb.add_parser("ls", help="the lab's hosts"))
    add_common(lb.add_parser("down", help="stop the lab's VMs and remove its hosts"))


async def run(args: argparse.Namespace, console: Console) -> int:
    # Imported here, not at the top: every ferry command builds this parser.
    from ferry.testing import lab
    from ferry.testing.hosts import DEFAULT_HOST_SUBNET

    host = args.host
    match args.lab_command:
        case "up":
            try:
                subnet = ipaddress.IPv4Network(args.subnet or DEFAULT_HOST_SUBNET)
            except ValueError as exc:
                raise ConfigError(f"--subnet: {exc}") from None
            hosts = await lab.lab_up(host, args.names, subnet=subnet)
            if args.json:
                emit_json(lab.describe(host))
            else:
                for h in hosts:
                    console.print(f"{h.name}: {h.address} (namespace {h.namespace})")
        case "exec":
            argv, env = lab.exec_argv(host, args.name, [*args.argv, *args.rest], os.environ)
            proc = await asyncio.create_subprocess_exec(*argv, env=env)
            try:
                return await proc.wait()
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                await proc.wait()
                raise
        case "ls":
            rows = lab.describe(host)
            if args.json:
                emit_json(rows)
            else:
                table = Table()
                for col in ("host", "address", "namespace", "up"):
                    table.add_column(col)
                for row in rows:
                    table.add_row(row["name"], row["address"], row["namespace"],
                                  "yes" if row["up"] else "no")
                console.print(table)
        case "down":
            done = await lab.lab_down(host)
            if args.json:
                emit_json({"done": done})
            else:
                for line in done or ["no lab here"]:
                    console.print(line)
    return ExitCode.OK
