"""``ferry doctor [--json] [--clean]``: what this host can run, and what to fix."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from ferry.cli.exitcodes import ExitCode
from ferry.cli.output import emit_json
from ferry.doctor import Check, Status, can_run_vms, clean, run_checks

_STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "red"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("doctor", help="check that this host can run ferry's VMs")
    p.add_argument("--clean", action="store_true",
                   help="first remove what crashed runs left behind")
    return p


def print_checks(console: Console, checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        console.print(f"[{_STYLE[c.status]}]{c.status.value:<4}[/] {c.name:<{width}}  "
                      f"{escape(c.detail)}")
        if c.output:
            console.print(f"     {'':<{width}}  [dim]output: {escape(c.output)}[/dim]")
        if c.advice:
            console.print(f"     {'':<{width}}  -> {escape(c.advice)}")


async def doctor(args: argparse.Namespace, console: Console) -> ExitCode:
    cleaned = await clean(args.host) if args.clean else []
    checks = await run_checks(args.host)
    ok = can_run_vms(checks)
    if args.json:
        emit_json({"ok": ok, "checks": [c.to_json() for c in checks], "cleaned": cleaned})
    else:
        for item in cleaned:
            console.print(f"removed {escape(item)}")
        print_checks(console, checks)
        console.print("this host can run ferry VMs" if ok else
                      "[red]this host cannot run ferry VMs until the failures above are fixed"
                      "[/red]")
    return ExitCode.OK if ok else ExitCode.ERROR
