"""``ferry vm migrate|receive|registry``: argument handling around the VM's control socket
(:class:`ferry.node.control.ControlClient`), :mod:`ferry.node.arrival` and
:mod:`ferry.live.pkgserve` (docs/live-migration.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from ferry.aio import cancel_and_wait
from ferry.cli.exitcodes import ExitCode
from ferry.errors import ConfigError, FerryError
from ferry.live.access import Access, TLSFiles
from ferry.live.pkgserve import check_directory, serve_registry
from ferry.live.rampath import RamPath
from ferry.live.summary import MigrationSummary
from ferry.migration.autocompress import LinkCompression
from ferry.node import history
from ferry.node.arrival import ArrivalRequest, arrive
from ferry.node.control import ControlClient, ExportReply, MigrateRequest
from ferry.node.process import launch_detached
from ferry.package import TrustStore
from ferry.transport import auth
from ferry.vm import registry
from ferry.vm.publish import parse_publish

Out = Callable[[Any, Callable[[], None]], None]
MIGRATE_TIMEOUT_S = 3600.0


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"bad address {text!r}: use HOST:PORT")
    return host.strip("[]"), int(port)


def _tls(args: argparse.Namespace) -> TLSFiles | None:
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise ConfigError("--tls-cert, --tls-key and --tls-ca go together")
    return TLSFiles(args.tls_cert.absolute(), args.tls_key.absolute(), args.tls_ca.absolute())


def _warn_insecure(console: Console, args: argparse.Namespace, what: str) -> None:
    if args.insecure:
        console.print(f"[bold red]warning:[/bold red] --insecure: {what} authenticates no one; "
                      "anyone who can reach it can take part. Use a token or mutual TLS.")


def _listening_access(args: argparse.Namespace, console: Console, what: str) -> Access:
    """The serving side: mutual TLS if given, else a fresh token (written to --token-file),
    unless --insecure."""
    tls = _tls(args)
    if args.insecure and (tls is not None or args.token_file is not None):
        raise ConfigError("--insecure excludes --tls-* and --token-file")
    _warn_insecure(console, args, what)
    access = Access.listening(tls, insecure=args.insecure)
    if access.token is not None and args.token_file is not None:
        auth.write_token_file(args.token_file, access.token)
    return access


def _connecting_access(args: argparse.Namespace, console: Console, what: str) -> Access:
    """The connecting side: TLS and/or the peer's token (--token-file or $FERRY_TOKEN)."""
    tls = _tls(args)
    if args.insecure:
        if tls is not None or args.token_file is not None:
            raise ConfigError("--insecure excludes --tls-* and --token-file")
        _warn_insecure(console, args, what)
        return Access(insecure=True)
    token = auth.token_from(args.token_file)
    if tls is None and token is None:
        raise ConfigError(f"{what} needs its token (--token-file PATH or ${auth.TOKEN_ENV}) "
                          "or mutual TLS (--tls-cert/--tls-key/--tls-ca); --insecure skips "
                          "authentication")
    return Access(tls=tls, token=token)


def _announce(out: Out, console: Console, event: dict[str, Any], text: str, access: Access,
              args: argparse.Namespace) -> None:
    """A listening side's event: with the token unless it went to --token-file."""
    note = ""
    if access.token is not None and args.token_file is not None:
        note = f" (token in {args.token_file})"
    elif access.token is not None:
        event["token"] = access.token
        note = f"\n  token: {access.token}  (give it to the peer as $FERRY_TOKEN or a --token-file)"
    out(event, lambda: console.print(text + note))


async def run(args: argparse.Namespace, console: Console, out: Out,
              progress: Callable[[str], None] = lambda line: None) -> int:
    match args.vm_command:
        case "migrate":
            return await _migrate(args, console, out, progress)
        case "receive":
            return await _receive(args, console, out)
        case "migrations":
            return _migrations(args, console, out)
        case _:
            return await _registry(args, console, out)


PROGRESS_EVERY_S = 0.5


async def report_progress(client: ControlClient, progress: Callable[[str], None],
                          done: asyncio.Event) -> None:
    """A line whenever the running migration's phase or dirty cycles change, and every
    few seconds meanwhile (the holder's status, :mod:`ferry.live.progress`), until
    ``done`` is set: ended by the event, not only by cancellation, which a library's
    wait can swallow (then ``ferry vm migrate`` would wait for it forever)."""
    last: tuple[str, int] | None = None
    last_at = 0.0
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROGRESS_EVERY_S):
                await done.wait()
        if done.is_set():
            return
        with contextlib.suppress(FerryError):
            p = (await client.status()).migration
            if p is None:
                continue
            key = (str(p["phase"]), int(p["cycles"]))
            now = time.monotonic()
            if key != last or now - last_at >= 3.0:
                last, last_at = key, now
                progress(f"{p['phase']}: {p['bytes_sent'] / 1e6:.1f} MB sent, "
                         f"{p['cycles']} dirty cycles, {p['elapsed_s']:.1f} s")


async def _migrate(args: argparse.Namespace, console: Console, out: Out,
                   progress: Callable[[str], None]) -> int:
    client = ControlClient(registry.VMPaths.of(args.host).control_socket(args.vm_id),
                           args.vm_id)
    mig_id = history.new_id()
    if args.to_package is not None and (args.max_mbit or args.timeout):
        raise ConfigError("--max-mbit and --timeout are for a live migration (--to)")
    if args.to_package is not None:
        req = MigrateRequest(package=args.to_package.absolute(),
                             key=(args.key or args.host.signing_key).absolute(),
                             precopy_only=args.precopy_only, migration_id=mig_id)
        progress(f"{args.vm_id}: pausing it, saving its device state and writing "
                 f"{req.package} (the guest stays paused until it is written)")
    else:
        req = MigrateRequest(to=_address(args.to), precopy_only=args.precopy_only,
                             ram=RamPath(args.ram),
                             access=_connecting_access(args, console, "the destination"),
                             migration_id=mig_id, max_mbit=args.max_mbit,
                             timeout_s=args.timeout,
                             compression=LinkCompression(args.compression))
        progress(f"{args.vm_id}: migrating to {args.to} (migration {mig_id})")
    task = asyncio.create_task(client.migrate(req, timeout_s=MIGRATE_TIMEOUT_S))
    reported = asyncio.Event()
    reporter = asyncio.create_task(report_progress(client, progress, reported))
    try:
        reply = await asyncio.shield(task)
    except asyncio.CancelledError:
        # Ctrl-C: ask the VM's holder to cancel (it resumes the VM unless it was handed off)
        # and wait for what happened before exiting.
        with contextlib.suppress(FerryError):
            await client.migrate_cancel()
        with contextlib.suppress(FerryError, TimeoutError):
            async with asyncio.timeout(60):
                await task
        if task.done() and not task.cancelled():
            error = task.exception()
            console.print(f"[red]interrupted:[/red] {error or 'completed'}")
        raise
    finally:
        reported.set()
        await cancel_and_wait(reporter, swallow_errors=True)
    if isinstance(reply, ExportReply):
        data = {"package": reply.package, "key_id": reply.key_id,
                "state_bytes": reply.state_bytes, "paused_s": reply.paused_s,
                "total_s": reply.total_s, "name": reply.name}
        out(data, lambda: console.print(
            f"{args.vm_id}: exported into {reply.package} (signed by {reply.key_id}, "
            f"paused {reply.paused_s * 1e3:.0f} ms); resume with 'ferry vm run "
            f"{reply.package}'"))
    else:
        out({"summary": reply.summary.to_json(), "source": dict(reply.source),
             "destination": None if reply.destination is None else dict(reply.destination)},
            lambda: print_summary(console, reply.summary, args.to))
    return ExitCode.OK


def _migrations(args: argparse.Namespace, console: Console, out: Out) -> int:
    if args.last < 1:
        raise ConfigError("--last must be at least 1")
    found = [r for r in history.MigrationHistory(args.host.state_root).records()
             if args.vm_filter is None or r.vm_id == args.vm_filter][-args.last:]

    def show() -> None:
        table = Table()
        for col in ("id", "vm", "to", "state", "started", "downtime", "bytes"):
            table.add_column(col)
        for r in found:
            s = r.summary or {}
            downtime = s.get("downtime_corrected_ms", s.get("downtime_source_view_ms"))
            table.add_row(r.id, r.vm_id, r.to, r.state,
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)),
                          "" if downtime is None else f"{downtime:.1f} ms",
                          "" if s.get("bytes_total") is None
                          else f"{s['bytes_total'] / 1e6:.1f} MB")
        console.print(table)

    out([r.to_json() for r in found], show)
    return ExitCode.OK


def downtime_text(s: MigrationSummary) -> str:
    """The downtime figures of a summary, each named for what it measures."""
    d = s.downtime
    parts = []
    if d.corrected_ms is not None:
        parts.append(f"[bold]{d.corrected_ms:.1f} ms[/bold] \u00b1 "
                     f"{d.corrected_uncertainty_ms or 0.0:.1f} (source paused -> "
                     f"destination running, clocks offset-corrected)")
    if d.source_view_ms is not None:
        parts.append(f"{d.source_view_ms:.1f} ms as the source saw it (paused -> "
                     f"\"running\" acknowledged)")
    return "; ".join(parts) or "not measured"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_summary(console: Console, s: MigrationSummary, to: str) -> None:
    steps = ", ".join(f"{k} {v:.1f}" for k, v in s.downtime.steps_ms.items())
    console.print(f"[green]{s.vm}[/green] migrated to {to}: downtime {downtime_text(s)}")
    if steps:
        console.print(f"  downtime steps (ms): {steps}")
    console.print(f"  total {_seconds(s.total_s)} s (pre-copy {_seconds(s.precopy_s)} s, "
                  f"post-copy {_seconds(s.postcopy_s)} s), {s.cycles} dirty cycles "
                  f"(stopped: {'none' if s.stop_reason is None else s.stop_reason.value}), "
                  f"{s.postcopy_fetches} post-copy fetches, "
                  f"mode {None if s.mode is None else s.mode.value}, verified {s.verified}")
    for name, d in s.devices.items():
        phases = ", ".join(f"{p} {b / 2**20:.1f} MiB" for p, b in d.bytes_by_phase.items())
        console.print(f"  {name:<10} {d.size_bytes / 2**20:7.1f} MiB: {phases}")


async def _receive(args: argparse.Namespace, console: Console, out: Out) -> int:
    forwards = None
    if args.publish is not None:
        forwards = tuple(parse_publish(s, allow_wildcard=args.allow_wildcard)
                         for s in args.publish)
    if args.registry:
        access = _connecting_access(args, console, "the registry")
    else:
        access = _listening_access(args, console, "this receiver")
    request = ArrivalRequest(
        host=args.host, access=access,
        listen=_address(args.listen) if args.listen else None,
        registry=_address(args.registry) if args.registry else None,
        package=args.package, name=args.name, forwards=forwards,
        precopy_only=args.precopy_only,
        report_until="listening" if args.listen else "ready",
        idle_timeout_s=args.idle_timeout)
    if args.detach:
        event = await launch_detached(request)
        event = {"event": request.report_until, **event}
        if args.listen:
            host, port = event["address"]
            _announce(out, console, event, f"receiving on {host}:{port} (pid {event['pid']})",
                      access, args)
        else:
            out(event, lambda: _print_ready(console, event))
        return ExitCode.OK

    def listening(address: tuple[str, int]) -> None:
        _announce(out, console, {"event": "listening", "address": list(address)},
                  f"receiving on {address[0]}:{address[1]}", access, args)

    def ready(report: dict[str, Any]) -> None:
        out({"event": "ready", **report}, lambda: _print_ready(console, report))

    left = await arrive(request, on_listening=listening, on_ready=ready)
    out({"event": "left", "mode": left.ending.value},
        lambda: console.print(f"VM left ({left.ending.value})"))
    if left.signal is not None:
        return ExitCode.TERMINATED if left.signal == signal.SIGTERM else ExitCode.INTERRUPTED
    return ExitCode.OK


def _print_ready(console: Console, r: dict[str, Any]) -> None:
    resumed = r["report"].get("handoff_to_running_ms")
    console.print(f"[green]{r['vm_id']}[/green] running here {r['running_s'] * 1e3:.0f} ms "
                  f"after the start" + (f", {resumed:.1f} ms from the hand-off's arrival to "
                                        f"running" if resumed is not None else ""))
    for fwd in r["forwards"]:
        console.print(f"  forward {fwd}")


async def _registry(args: argparse.Namespace, console: Console, out: Out) -> int:
    host, port = _address(args.listen)
    check_directory(args.dir)
    trust = TrustStore.from_path(args.trust) if args.trust else TrustStore.for_host(args.host)
    access = _listening_access(args, console, "this registry")

    def listening(a: tuple[str, int]) -> None:
        _announce(out, console, {"event": "listening", "address": list(a)},
                  f"registry of {args.dir} on {a[0]}:{a[1]}", access, args)

    await serve_registry(args.dir, host, port, trust=trust,
                         cache_dir=args.host.package_cache, access=access,
                         on_listening=listening)
    return ExitCode.OK
