"""This host's QEMU version, as ``qemu-system-x86_64 --version`` says it."""

from __future__ import annotations

import asyncio
import re

from ferry.qemu.argv import QEMU_BINARY


async def host_qemu_version(qemu: str = QEMU_BINARY) -> str | None:
    """``"10.0.2"`` for example; None if QEMU does not run or says no version."""
    try:
        proc = await asyncio.create_subprocess_exec(
            qemu, "--version", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except (OSError, TimeoutError):
        return None
    match = re.search(rb"version (\d+\.\d+\.\d+)", out)
    return match.group(1).decode() if match else None
