"""``ferry demo``: the richest end-to-end demo that works today, rendered for people."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from ferry.cli.exitcodes import ExitCode
from ferry.cli.output import emit_json
from ferry.cli.progress import show_progress
from ferry.cli.vm_migrate import downtime_text
from ferry.demo.storage import run_storage_demo
from ferry.migration.destination import Receiver
from ferry.migration.source import Migrator


async def run_demos(args: argparse.Namespace, console: Console) -> ExitCode:
    parts = args.parts or ["migrate", "vm", "storage", "evacuate"]
    if {"migrate", "vm", "evacuate"} & set(parts) and not await host_ready(args, console):
        return ExitCode.ERROR
    runners = {"migrate": migrate_demo, "vm": vm_demo, "storage": storage_demo,
               "evacuate": evacuate_demo}
    results: dict[str, ExitCode] = {}
    for part in parts:
        results[part] = await runners[part](args, console)
    return max(results.values(), default=ExitCode.OK)


async def host_ready(args: argparse.Namespace, console: Console) -> bool:
    """``ferry doctor`` first: the VM demos stop here, with its advice, on a host that
    cannot run VMs; otherwise it says which accelerator the VMs will use and why."""
    from ferry.cli.doctor import print_checks
    from ferry.doctor import Status, can_run_vms, run_checks

    checks = await run_checks(args.host)
    if not can_run_vms(checks):
        if not args.json:
            console.print("[red]this host cannot run the VM demos:[/red]")
        print_checks(console, [c for c in checks if c.status is not Status.OK])
        return False
    if not args.json:
        accel = next((c for c in checks if c.name == "accelerator"), None)
        if accel is not None:
            console.print(f"[dim]accelerator: {escape(accel.detail)}[/dim]")
    return True


async def migrate_demo(args: argparse.Namespace, console: Console) -> ExitCode:
    from ferry.demo.migrate import SERVICE_ADDRESS, run_migrate_demo

    if not args.json:
        console.print(
            "[bold]ferry migrate demo[/bold]: a Redis VM live-migrating between two hosts "
            "while a client on a third host writes to it on one connection"
        )

    def progress(line: str) -> None:
        if not args.json and not args.no_progress:
            console.print(f"  [dim]…[/dim] {escape(line)}")

    result = await run_migrate_demo(progress, args.host)
    hops = (("A -> B (first hop: B's page cache and QEMU are cold)", result.summary),
            ("B -> A (back to a host that ran this guest)", result.return_summary))
    if args.json:
        emit_json({"migrate": {"summary": None if result.summary is None
                               else result.summary.to_json(),
                               "return_summary": None if result.return_summary is None
                               else result.return_summary.to_json(),
                               "acknowledged_writes": result.acknowledged,
                               "lost_writes": len(result.lost),
                               "client_max_stall_ms": result.client_max_stall_ms,
                               "client_reconnects": result.client_reconnects,
                               "ok": result.ok}})
    else:
        for label, hop in hops:
            if hop is None:
                continue
            steps = ", ".join(f"{k} {v:.1f}" for k, v in hop.downtime.steps_ms.items())
            console.print(f"  migrated {label}: downtime {downtime_text(hop)}")
            console.print(f"    downtime steps (ms): {steps}")
            console.print(
                f"    total {hop.total_s or 0:.2f} s, {hop.cycles} dirty cycles, "
                f"{hop.postcopy_fetches} post-copy fetches, every block verified: "
                f"{hop.verified}")
        verdict = "[green]all readable[/green]" if result.ok else "[red]LOST WRITES[/red]"
        console.print(
            f"  client: {result.acknowledged} acknowledged writes, {len(result.lost)} lost "
            f"({verdict}); longest gap between writes {result.client_max_stall_ms:.0f} ms"
        )
        kept = ("[green]one connection survived both moves, 0 resets[/green]"
                if result.client_reconnects == 0
                else f"[red]{result.client_reconnects} reconnects[/red]")
        console.print(f"  client connection to the VM's service address {SERVICE_ADDRESS}: "
                      f"{kept}")
    return ExitCode.OK if result.ok else ExitCode.ERROR


async def vm_demo(args: argparse.Namespace, console: Console) -> ExitCode:
    from ferry.demo.vm import run_vm_demo

    if not args.json:
        console.print(
            "[bold]ferry VM demo[/bold]: a Redis VM, snapshotted into a signed "
            "package and resumed from it in its own network namespace"
        )

    def progress(line: str) -> None:
        if not args.json and not args.no_progress:
            console.print(f"  [dim]…[/dim] {escape(line)}")

    result = await run_vm_demo(progress, args.host)
    if args.json:
        emit_json(
            {
                "vm": {
                    "package": str(result.package),
                    "package_bytes": result.package_bytes,
                    "package_reused": result.package_reused,
                    "port": result.port,
                    "launch_to_pong_ms": result.launch_to_pong_ms,
                    "resume": result.resume,
                    "greeting": result.greeting,
                    "ok": result.ok,
                }
            }
        )
    else:
        t = result.resume
        steps = ", ".join(
            f"{k.removesuffix('_s')} {v * 1e3:.0f} ms" for k, v in t.items() if isinstance(v, float)
        )
        console.print(
            f"  package {result.package} ({result.package_bytes / 2**20:.1f} MiB"
            f"{', reused' if result.package_reused else ''}), signature verified"
        )
        console.print(
            f"  resumed: first Redis PONG on 127.0.0.1:{result.port} "
            f"[bold]{result.launch_to_pong_ms:.0f} ms[/bold] after launch ({steps})"
        )
        verdict = "[green]yes[/green]" if result.ok else "[red]NO[/red]"
        console.print(
            f"  GET greeting -> {result.greeting!r}; SET/GET after resume works: "
            f"{verdict}; VM {result.vm_id} stopped and discarded"
        )
    return ExitCode.OK if result.ok else ExitCode.ERROR


async def evacuate_demo(args: argparse.Namespace, console: Console) -> ExitCode:
    from ferry.demo.evacuate import VMS, run_evacuate_demo

    if not args.json:
        console.print(
            f"[bold]ferry evacuate demo[/bold]: {VMS} Redis VMs under write load on a node "
            "that gets a GCP preemption notice; the node moves every VM out live")

    def progress(line: str) -> None:
        if not args.json and not args.no_progress:
            console.print(f"  [dim]…[/dim] {escape(line)}")

    result = await run_evacuate_demo(progress, args.host)
    if args.json:
        emit_json({"evacuate": result.to_json()})
        return ExitCode.OK if result.ok else ExitCode.ERROR
    for m in result.moved:
        console.print(f"  {m['vm']} -> {m['to']}: downtime [bold]{m['downtime_ms']:.1f} ms"
                      "[/bold]" if m.get("downtime_ms") is not None
                      else f"  {m['vm']} -> {m['to']}: downtime not measured")
    for p in result.packaged:
        console.print(f"  [red]{p['vm']} packaged[/red] ({p['reason']}): {p['package']}")
    for f in result.failed:
        console.print(f"  [red]{f['vm']} failed[/red]: {f.get('error')}")
    in_time = ("[green]within[/green]" if result.notice_to_done_s <= result.window_s
               else "[red]PAST[/red]")
    console.print(
        f"  notice to done: [bold]{result.notice_to_done_s:.1f} s[/bold] ({in_time} GCP's "
        f"{result.window_s:.0f} s window; the watcher saw the notice after "
        f"{result.notice_seen_s * 1e3:.0f} ms; order {result.order}, reason {result.reason})")
    verdict = ("[green]all readable[/green]" if result.lost_writes == 0
               else "[red]LOST WRITES[/red]" if result.lost_writes > 0
               else "[red]not checked[/red]")
    console.print(f"  clients: {result.acknowledged} acknowledged writes, "
                  f"{max(result.lost_writes, 0)} lost ({verdict})")
    return ExitCode.OK if result.ok else ExitCode.ERROR


async def storage_demo(args: argparse.Namespace, console: Console) -> ExitCode:
    total = sum(args.size_mib) * 2**20
    state: dict[str, Migrator] = {}

    def on_start(m: Migrator, r: Receiver) -> None:
        state["m"] = m

    def sample() -> tuple[str, int, int]:
        m = state.get("m")
        if m is None:
            return ("filling devices", 0, total)
        p = m.progress
        label = p.phase.value + (f" (cycle {p.cycle})" if p.cycle else "")
        return (label, p.bytes_sent, max(total, p.bytes_sent))

    if not args.json:
        console.print(
            f"[bold]ferry storage demo[/bold]: migrating devices of {args.size_mib} MiB over "
            f"loopback TCP while a writer changes them at {args.write_rate_mib_s} MiB/s"
        )
    async with show_progress(console, sample, enabled=not args.no_progress and not args.json):
        result = await run_storage_demo(
            size_mib=args.size_mib, write_rate_mib_s=args.write_rate_mib_s, on_start=on_start
        )
    report = result.report
    if args.json:
        emit_json(
            {
                "identical": result.identical,
                "writes": result.writes,
                "written_bytes": result.written_bytes,
                "digests": result.digests,
                "migration": report.to_json(),
            }
        )
        return ExitCode.OK if result.identical else ExitCode.INTEGRITY
    for d in report.devices:
        cycles = ", ".join(str(n) for n in d.dirty_blocks_by_cycle)
        console.print(
            f"  {d.name:<7} {d.size_bytes / 2**20:7.1f} MiB  sent {d.bytes_total / 2**20:7.1f} MiB"
            f"  zero blocks {d.zero_blocks:6d}  dirty blocks per scan: {cycles}"
        )
    mib = sum(d.size_bytes for d in report.devices) / 2**20
    downtime = (report.suspend_to_handoff_ack_s or 0) * 1e3
    console.print(
        f"  writer: {result.writes} writes ({result.written_bytes / 2**20:.1f} MiB) during the "
        f"migration; {report.cycles} dirty cycles"
    )
    console.print(
        f"  total {report.total_s:.2f} s ({mib / report.total_s:.0f} MiB/s), suspended for "
        f"{downtime:.1f} ms"
    )
    ok = result.identical and result.receive.verified
    verdict = "[green]identical[/green]" if ok else "[red]DIFFERENT[/red]"
    console.print(
        f"  verification: destination vs source at the hand-off: {verdict} "
        f"(sha256 {', '.join(f'{k}={v}' for k, v in result.digests.items())})"
    )
    return ExitCode.OK if ok else ExitCode.INTEGRITY
