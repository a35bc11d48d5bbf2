"""Compiling the guest agent for the image builder.

The agent is one C file (``ferry/guest/files/agent/agent.c``) compiled with
``gcc -static -O2``: guests are busybox-only, with no libc to link against.
The binary is cached under ``<cache>/agent/<source digest>/agent``, so it is
compiled once per source version; image cache keys include the same digest,
so a changed agent rebuilds every image.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

from ferry.guest.image.cache import building
from ferry.guest.image.errors import ImageError

log = logging.getLogger(__name__)

AGENT_SOURCE = Path(__file__).resolve().parent.parent / "files" / "agent" / "agent.c"
CC = "gcc"
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s")


def agent_source_digest() -> str:
    """SHA-256 of the agent source and the compiler flags (the binary's cache key)."""
    h = hashlib.sha256(AGENT_SOURCE.read_bytes())
    h.update("\0".join(CFLAGS).encode())
    return h.hexdigest()


def agent_binary(cache_root: Path) -> Path:
    """The compiled agent for the current source, compiling it if not cached."""
    entry = cache_root / "agent" / agent_source_digest()[:16]
    binary = entry / "agent"
    if binary.is_file():
        return binary
    cc = shutil.which(CC)
    if cc is None:
        raise ImageError(f"{CC} not found: the guest agent needs gcc and libc6-dev "
                         "(apt-get install gcc libc6-dev)")
    with building(entry) as scratch:
        proc = subprocess.run([cc, *CFLAGS, "-o", str(scratch / "agent"), str(AGENT_SOURCE)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ImageError(f"compiling the guest agent failed ({proc.returncode}): "
                             f"{proc.stderr.strip()}")
    log.info("compiled guest agent %s", binary)
    return binary
