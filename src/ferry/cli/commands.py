"""Implementations of the CLI subcommands: argument plumbing around library calls."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ferry.cli.exitcodes import ExitCode
from ferry.cli.output import emit_json
from ferry.cli.progress import show_progress
from ferry.errors import ConfigError
from ferry.migration.config import Config, DeviceConfig, TLSConfig, load_config
from ferry.migration.destination import Receiver
from ferry.migration.files import (
    check_target_directory,
    migrate_in,
    migrate_out,
    open_source_files,
)
from ferry.migration.report import MigrationReport
from ferry.migration.source import Migrator
from ferry.transport.auth import new_token, token_from, write_token_file
from ferry.transport.base import Stream
from ferry.transport.endpoint import Scheme, listen, parse_endpoint
from ferry.transport.pipe import stdio_stream
from ferry.transport.secure import Guard, accept_peer, connect_peer, guard_for
from ferry.transport.tls import client_context, server_context


async def run(args: argparse.Namespace, console: Console) -> ExitCode | int:
    match args.command:
        case "vm" | "key" | "package" | "volume":
            from ferry.cli import vm as vm_cli

            return await vm_cli.run(args, console)
        case "demo":
            return await demo(args, console)
        case "serve":
            return await serve(args, console)
        case "receive":
            return await receive(args, console)
        case "inspect":
            return await inspect(args, console)
        case "certs":
            return certs(args, console)
        case "doctor":
            from ferry.cli.doctor import doctor

            return await doctor(args, console)
        case "daemon":
            from ferry.cli.daemon import daemon

            return await daemon(args, console)
        case "events":
            from ferry.cli.daemon import events

            return await events(args, console)
        case "node":
            from ferry.cli import node

            return await node.run(args, console)
        case "lab":
            from ferry.cli import lab

            return await lab.run(args, console)
        case "image":
            from ferry.cli import image

            return await image.run(args, console)
    raise ConfigError(f"unknown command {args.command}")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config) if args.config else Config()


def _tls(args: argparse.Namespace, config: Config) -> TLSConfig | None:
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    tls = config.tls
    if any(given):
        if not all(given):
            raise ConfigError("--tls-cert, --tls-key and --tls-ca go together")
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is not None:
        for what, path in (("certificate", tls.cert), ("key", tls.key), ("CA", tls.ca)):
            if not path.is_file():
                raise ConfigError(f"TLS {what} {path} is not a file")
    return tls


def _devices(args: argparse.Namespace, config: Config) -> list[DeviceConfig]:
    devices = list(config.devices)
    for spec in args.devices:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ConfigError(f"expected NAME=PATH, got {spec!r}")
        devices.append(DeviceConfig(name, Path(path), config.migration.block_size_bytes))
    if not devices:
        raise ConfigError("no devices given (NAME=PATH arguments or [[device]] in the config)")
    return devices


def _show_report(console: Console, report: MigrationReport) -> None:
    table = Table(title="migration")
    for col in ("device", "size", "sent", "zero blocks", "base blocks", "post-copy fetches"):
        table.add_column(col, justify="right" if col != "device" else "left")
    for d in report.devices:
        table.add_row(
            d.name,
            f"{d.size_bytes / 2**20:.1f} MiB",
            f"{d.bytes_total / 2**20:.1f} MiB",
            str(d.zero_blocks),
            str(d.base_blocks),
            str(d.postcopy_fetches),
        )
    console.print(table)
    suspend = report.suspend_to_handoff_ack_s
    downtime = f"{suspend * 1e3:.1f} ms" if suspend is not None else "n/a"
    console.print(
        f"{report.outcome}: {report.total_s:.2f} s total, {report.cycles} dirty cycles "
        f"(stopped: {report.stop_reason or 'none'}), "
        f"hand-off after {downtime} of suspension"
    )


async def serve(args: argparse.Namespace, console: Console) -> ExitCode:
    config = _config(args)
    devices = _devices(args, config)
    tls = _tls(args, config)
    endpoint = parse_endpoint(args.listen)
    group = open_source_files(devices)
    state: dict[str, Migrator] = {}

    def sample() -> tuple[str, int, int]:
        m = state.get("m")
        if m is None:
            return ("waiting for receiver", 0, 0)
        p = m.progress
        return (
            p.phase.value,
            min(p.bytes_sent, sum(d.size_bytes for d in devices_sizes)),
            sum(d.size_bytes for d in devices_sizes),
        )

    devices_sizes = [_Sized(d.path.stat().st_size) for d in devices]
    stream: Stream
    try:
        if endpoint.scheme is Scheme.STDIO:
            stream = await stdio_stream()
        else:
            ctx = server_context(tls.cert, tls.key, tls.ca) if tls else None
            guard = guard_for(endpoint, tls=ctx is not None, insecure=args.insecure)
            token = _serving_token(args, console) if guard is Guard.TOKEN else None
            if guard is Guard.INSECURE:
                _warn_insecure(console)
            async with await listen(endpoint, ssl_context=ctx) as listener:
                console.print(
                    f"serving {len(devices)} device(s) on {listener.address} ({guard.value})"
                )
                stream = await accept_peer(listener, guard, token)
        async with show_progress(console, sample, enabled=not args.no_progress and not args.json):
            report = await migrate_out(
                group, stream, config.migration, on_start=lambda m: state.__setitem__("m", m)
            )
    finally:
        await group.close()
    if args.json:
        emit_json(report.to_json())
    else:
        _show_report(console, report)
    return ExitCode.OK


def _serving_token(args: argparse.Namespace, console: Console) -> str:
    """$FERRY_TOKEN if the caller chose one, else a fresh token; shown on stderr
    and written to --token-file."""
    token = token_from(None) or new_token()
    if args.token_file is not None:
        write_token_file(args.token_file, token)
    console.print(f"token: {token}", soft_wrap=True, highlight=False)
    return token


def _warn_insecure(console: Console) -> None:
    console.print(
        "[yellow]warning:[/yellow] --insecure: no TLS and no token; anyone who can reach "
        "this endpoint first sends or receives the data",
        soft_wrap=True,
    )


class _Sized:
    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes


async def receive(args: argparse.Namespace, console: Console) -> ExitCode:
    config = _config(args)
    check_target_directory(args.into)  # a bad --into fails before we connect
    tls = _tls(args, config)
    endpoint = parse_endpoint(args.source)
    ctx: ssl.SSLContext | None = None
    if tls is not None:
        ctx = client_context(tls.cert, tls.key, tls.ca)
    guard = guard_for(endpoint, tls=ctx is not None, insecure=args.insecure)
    token = token_from(args.token_file)
    if guard is Guard.INSECURE and token is not None:
        guard = Guard.TOKEN  # a token given anyway is presented
    if guard is Guard.INSECURE:
        _warn_insecure(console)
    stream = await connect_peer(
        endpoint, guard, token, ssl_context=ctx, server_hostname=args.server_name
    )
    state: dict[str, Receiver] = {}

    def sample() -> tuple[str, int, int]:
        r = state.get("r")
        if r is None:
            return ("connecting", 0, 0)
        return (r.phase.value, r.report.bytes_received, 0)

    async with show_progress(console, sample, enabled=not args.no_progress and not args.json):
        report = await migrate_in(
            stream,
            args.into,
            config.migration,
            overwrite=args.overwrite,
            on_start=lambda r: state.__setitem__("r", r),
        )
    if args.json:
        emit_json(report)
    else:
        console.print(
            f"received {len(report.devices)} device(s) into {args.into}: "
            f"{report.bytes_received / 2**20:.1f} MiB in {report.total_s:.2f} s, verified"
        )
    return ExitCode.OK


async def inspect(args: argparse.Namespace, console: Console) -> ExitCode:
    from ferry.storage.inspect import inspect_file

    if not args.path.is_file():
        raise ConfigError(f"{args.path} is not a file")
    summary = await inspect_file(
        args.path, block_size_bytes=args.block_size, with_hashes=args.hashes
    )
    if args.json:
        emit_json(summary)
        return ExitCode.OK
    console.print(
        f"{summary.path}: {summary.size_bytes} bytes, {summary.block_count} blocks "
        f"of {summary.block_size_bytes}"
    )
    console.print(
        f"  allocated blocks: {summary.allocated_blocks}, all-zero blocks: {summary.zero_blocks}"
    )
    console.print(f"  sha256: {summary.sha256}")
    for i, h in enumerate(summary.block_hashes):
        console.print(f"  block {i}: {h}")
    return ExitCode.OK


def certs(args: argparse.Namespace, console: Console) -> ExitCode:
    from ferry.transport.certs import create_ca, create_host_cert

    if args.certs_command == "ca":
        files = create_ca(args.dir, args.name, overwrite=args.overwrite)
        result: dict[str, str] = {"cert": str(files.cert_path), "key": str(files.key_path)}
    else:
        host = create_host_cert(args.ca, args.out, args.hostname, args.ip, dns_names=args.dns)
        result = {"cert": str(host.cert_path), "key": str(host.key_path), "ca": str(host.ca_path)}
    if args.json:
        emit_json(result)
    else:
        for k, v in result.items():
            console.print(f"{k}: {v}")
    return ExitCode.OK


async def demo(args: argparse.Namespace, console: Console) -> ExitCode:
    from ferry.cli.demo import run_demos

    return await run_demos(args, console)
