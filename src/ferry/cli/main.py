"""The ``ferry`` command: parses arguments and calls the library.

Subcommands (see docs/cli.md):

    ferry demo                      the main end-to-end demo
    ferry serve  [-c CONFIG] --listen EP NAME=PATH...   migrate device files to a receiver
    ferry receive [-c CONFIG] --from EP --into DIR      receive a device group into files
    ferry inspect FILE                                  size, blocks, hashes of a device file
    ferry certs ca DIR / ferry certs host ...           mutual-TLS certificates
    ferry vm build|snapshot|run|list|exec|stop          VMs (docs/vm.md)
    ferry key create|trust / ferry package create|verify|extract   signed packages
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from ferry.cli.exitcodes import ExitCode
from ferry.errors import (
    BrokenResourceError,
    ConfigError,
    FerryError,
    IntegrityError,
    PeerError,
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Portable, live-migrating virtual machines."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the main end-to-end demo")
    p.add_argument("parts", nargs="*", choices=["migrate", "vm", "storage", []], default=[],
                   help="which demos to run (default: migrate, vm, then storage)")
    p.add_argument(
        "--size-mib",
        type=int,
        nargs="+",
        default=[256, 128],
        help="sizes of the demo devices (default: 256 128)",
    )
    p.add_argument(
        "--write-rate-mib-s",
        type=float,
        default=20.0,
        help="rate of the concurrent writer (default: 20)",
    )
    _add_common(p)

    p = sub.add_parser("serve", help="migrate device files to the receiver that connects")
    p.add_argument("-c", "--config", type=Path, help="TOML config (docs/cli.md)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:7000",
        help="endpoint to listen on, or 'stdio' (default: 127.0.0.1:7000)",
    )
    p.add_argument(
        "devices", nargs="*", metavar="NAME=PATH", help="devices (or [[device]] in config)"
    )
    _add_tls(p)
    _add_common(p)

    p = sub.add_parser("receive", help="receive a device group into files")
    p.add_argument("-c", "--config", type=Path, help="TOML config (docs/cli.md)")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="endpoint of the source: HOST:PORT, unix:///path, stdio, exec:CMD",
    )
    p.add_argument("--into", type=Path, required=True, help="directory for the received devices")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--server-name", help="name the source's TLS certificate must carry")
    _add_tls(p)
    _add_common(p)

    p = sub.add_parser("inspect", help="describe a device file")
    p.add_argument("path", type=Path)
    p.add_argument("--block-size", type=int, default=65536)
    p.add_argument("--hashes", action="store_true", help="list every block hash")
    _add_common(p)

    p = sub.add_parser("certs", help="create mutual-TLS certificates")
    certs = p.add_subparsers(dest="certs_command", required=True)
    c = certs.add_parser("ca", help="create a certificate authority in DIR")
    c.add_argument("dir", type=Path)
    c.add_argument("--name", default="ferry-ca")
    c.add_argument("--overwrite", action="store_true")
    _add_common(c)
    c = certs.add_parser("host", help="issue a host certificate signed by the CA")
    c.add_argument("--ca", type=Path, required=True, help="CA directory")
    c.add_argument("--out", type=Path, required=True, help="output directory")
    c.add_argument("hostname")
    c.add_argument("--ip", action="append", default=[], help="IP address SAN (repeatable)")
    c.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    _add_common(c)

    from ferry.cli import vm as vm_cli

    vm_cli.add_parsers(sub, _add_common)
    return parser


def _add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, help="this host's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="this host's private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="CA that signed the peer's certificate")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def exit_code_for(exc: BaseException) -> ExitCode:
    from ferry.package.errors import PackageFormatError, PackageTamperedError, SignatureError

    if isinstance(exc, PackageTamperedError | PackageFormatError | SignatureError):
        return ExitCode.INTEGRITY  # a package that does not verify
    if isinstance(exc, ConfigError):
        return ExitCode.USAGE
    if isinstance(exc, IntegrityError):
        return ExitCode.INTEGRITY
    if isinstance(exc, PeerError | BrokenResourceError):
        return ExitCode.PEER
    if isinstance(exc, FerryError) and exc.__cause__ is not None:
        return exit_code_for(exc.__cause__)
    return ExitCode.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Progress and messages go to stderr so stdout stays clean for --json and pipes.
    console = Console(stderr=True)
    from ferry.cli import commands

    try:
        return int(asyncio.run(commands.run(args, console)))
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return ExitCode.INTERRUPTED
    except FerryError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
