"""Argument types and option groups shared by ferry's commands.

Values are checked while parsing, so a bad number is a usage error (exit 2)
before anything starts. :func:`host_config` turns the environment and
``--accel`` into the :class:`~ferry.hostconfig.HostConfig` every command gets.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping

from ferry.hostconfig import HostConfig, parse_accel


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def host_config(args: argparse.Namespace, environ: Mapping[str, str]) -> HostConfig:
    """This host's configuration: ``environ``'s (ferry.hostconfig), ``--accel`` on top.

    Built once per command and passed down; the holders a command starts get it
    on their request pipe, so ``--accel`` reaches them without the environment."""
    host = HostConfig.from_environ(environ)
    accel = getattr(args, "accel", None)
    return host if accel is None else dataclasses.replace(host, accel=parse_accel(accel))


def add_accel(p: argparse.ArgumentParser) -> None:
    """``--accel`` for commands that start VMs (overrides ``FERRY_ACCEL``)."""
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"],
                   help="QEMU accelerator (default: $FERRY_ACCEL, else auto: KVM only if a "
                        "guest boots under it here)")
