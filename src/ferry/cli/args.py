"""Argument types and option groups shared by ferry's commands.

Values are checked while parsing, so a bad number is a usage error (exit 2)
before anything starts.
"""

from __future__ import annotations

import argparse


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


def add_accel(p: argparse.ArgumentParser) -> None:
    """``--accel`` for commands that start VMs (sets ``FERRY_ACCEL`` for their processes)."""
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"],
                   help="QEMU accelerator (default: $FERRY_ACCEL, else auto: KVM only if a "
                        "guest boots under it here)")
