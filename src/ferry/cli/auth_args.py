"""The authentication flags of ``ferry serve`` and ``ferry receive`` (docs/cli.md).

Kept apart from ``main.py`` so the parser there only has to call them. There
is deliberately no ``--token VALUE``: every local user can read a command
line through ``ps``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_auth_arguments(p: argparse.ArgumentParser, *, serving: bool) -> None:
    if serving:
        p.add_argument(
            "--token-file",
            type=Path,
            help="also write the one-time token to this file (mode 0600)",
        )
    else:
        p.add_argument(
            "--token-file",
            type=Path,
            help="file holding the source's one-time token (default: $FERRY_TOKEN)",
        )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain TCP with neither TLS nor token: whoever connects first gets the data",
    )
