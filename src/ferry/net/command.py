"""Running ``ip``/``nft``/``sysctl`` and translating their failures.

ferry shells out to iproute2 and nftables rather than speaking netlink
itself: the commands are what an operator types to inspect the same state,
their error messages are already good, and a failing step can be replayed
by hand. Every failure becomes a :class:`NetCommandError` carrying argv,
exit status and stderr, here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ferry.net.errors import NetCommandError, NetError

log = logging.getLogger(__name__)


async def run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run ``argv``, return its stdout; raise :class:`NetCommandError` on a non-zero exit.

    With ``check=False`` a failure is only logged at DEBUG and stdout is
    returned anyway (for best-effort teardown steps).
    """
    log.debug("$ %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise NetError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except BaseException:
        # Cancelled mid-command: do not leave the child behind.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode is not None
    if proc.returncode != 0:
        if check:
            raise NetCommandError(argv, proc.returncode, stderr)
        log.debug("ignored failure of %s: %s", " ".join(argv), stderr.strip())
    return stdout
