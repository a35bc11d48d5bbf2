"""The ``ferry`` command: parses arguments and calls the library.

Subcommands (see docs/cli.md):

    ferry demo                      the main end-to-end demo
    ferry doctor [--clean]          can this host run ferry's VMs, and what to fix
    ferry daemon [--listen-tcp A:P --token-file F]     this node's daemon (HTTP API)
    ferry events                                       follow the daemon's events
    ferry node watch-spot [--provider auto]            print the provider's spot notices
    ferry serve  [-c CONFIG] --listen EP NAME=PATH...   migrate device files to a receiver
    ferry receive [-c CONFIG] --from EP --into DIR      receive a device group into files
    ferry inspect FILE                                  size, blocks, hashes of a device file
    ferry certs ca DIR / ferry certs host ...           mutual-TLS certificates
    ferry image pull REF                                an OCI image as a root filesystem
    ferry vm build|snapshot|run|list|exec|attach|stop   VMs (docs/vm.md)
    ferry key create|trust / ferry package create|verify|extract|add|push|pull   signed packages
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ferry.cli.args import add_accel, host_config, positive_float, positive_int
from ferry.cli.auth_args import add_auth_arguments
from ferry.cli.failure import run_command


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true",
                   help="on failure, print the Python traceback too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Portable, live-migrating virtual machines."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the main end-to-end demo")
    p.add_argument("parts", nargs="*", choices=["migrate", "vm", "storage", "evacuate", []],
                   default=[],
                   help="which demos to run (default: migrate, vm, storage, then evacuate)")
    p.add_argument(
        "--size-mib",
        type=positive_int,
        nargs="+",
        default=[256, 128],
        help="sizes of the demo devices (default: 256 128)",
    )
    p.add_argument(
        "--write-rate-mib-s",
        type=positive_float,
        default=20.0,
        help="rate of the concurrent writer (default: 20)",
    )
    add_accel(p)
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
    add_auth_arguments(p, serving=True)
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
    add_auth_arguments(p, serving=False)
    _add_common(p)

    p = sub.add_parser("inspect", help="describe a device file")
    p.add_argument("path", type=Path)
    p.add_argument("--block-size", type=positive_int, default=65536)
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

    from ferry.cli import daemon as daemon_cli
    from ferry.cli import doctor as doctor_cli
    from ferry.cli import image as image_cli
    from ferry.cli import lab as lab_cli
    from ferry.cli import node as node_cli
    from ferry.cli import vm as vm_cli

    p = doctor_cli.add_parser(sub)
    _add_common(p)
    p = daemon_cli.add_parser(sub)
    _add_common(p)
    p = daemon_cli.add_events_parser(sub)
    _add_common(p)
    p = image_cli.add_parser(sub)
    _add_common(p)

    vm_cli.add_parsers(sub, _add_common)
    lab_cli.add_parser(sub, _add_common)
    node_cli.add_parser(sub, _add_common)
    return parser


def _add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, help="this host's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="this host's private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="CA that signed the peer's certificate")


def split_rest(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` before the first ``--``, and what follows it (a guest command line)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    head, rest = split_rest(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(head)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unexpected arguments after '--': {' '.join(rest)}")
    args.rest = rest
    level = logging.WARNING - 10 * min(args.verbose, 2)
    fmt = ("%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose
           else "ferry: %(levelname)s: %(message)s")
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    if args.verbose == 0:
        logging.addLevelName(logging.WARNING, "warning")
        logging.addLevelName(logging.ERROR, "error")
    # Progress and messages go to stderr so stdout stays clean for --json and pipes;
    # soft_wrap: never wrap lines (paths stay whole, scripts can grep them).
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    from ferry.cli import commands


    async def command() -> int:
        # The one place ferry reads its host configuration from the environment; a bad
        # value (FERRY_ACCEL=hvf) is a ConfigError with its exit code, like any other.
        args.host = host_config(args, os.environ)
        return await commands.run(args, console)

    return run_command(command, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
