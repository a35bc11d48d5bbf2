"""Running skopeo, umoci and mkfs.ext4, and translating their failures once.

ferry speaks to registries only through ``skopeo`` (no registry client of its own):
it handles HTTPS, the docker credential files (``$XDG_RUNTIME_DIR/containers/auth.json``,
``~/.docker/config.json``), token auth and blob digest checks. ``umoci`` applies layers
(whiteouts, opaque directories, hard links, owners, modes). A child still running
when the caller is cancelled is killed before the cancellation propagates.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence

from ferry.oci.errors import (
    ImageIntegrityError,
    ImageNotFoundError,
    OCIError,
    RegistryError,
    UnpackError,
)

log = logging.getLogger(__name__)

# skopeo logs `time=... level=fatal msg="..."`; the message is what a user needs.
_MSG_RE = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_PREFIX_RE = re.compile(r'^Error parsing image name "[^"]*": ')
_NOT_FOUND = ("manifest unknown", "name unknown", "blob unknown", "not found")
_INTEGRITY = ("digest did not match", "digest mismatch", "does not match", "size mismatch")


async def run(argv: Sequence[str]) -> tuple[int, bytes, str]:
    """Run ``argv``; return (exit status, stdout, stderr)."""
    log.debug("$ %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise OCIError(f"cannot run {argv[0]}: {exc} (scripts/setup.sh installs it)",
                       reference=argv[-1]) from exc
    try:
        out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err.decode(errors="replace")


def skopeo_message(stderr: str) -> str:
    """The one line that says what went wrong, from skopeo's log output."""
    found = _MSG_RE.findall(stderr)
    text = found[-1].replace('\\"', '"') if found else stderr.strip()
    text = _PREFIX_RE.sub("", text)
    return " ".join(text.split()) or "failed without a message"


def skopeo_error(stderr: str, reference: str) -> OCIError:
    """The typed error for a failed skopeo run."""
    message = skopeo_message(stderr)
    lowered = message.lower()
    if any(s in lowered for s in _INTEGRITY):
        return ImageIntegrityError(message, reference=reference)
    if any(s in lowered for s in _NOT_FOUND):
        return ImageNotFoundError(message, reference=reference)
    return RegistryError(message, reference=reference)


async def skopeo(args: Sequence[str], *, reference: str) -> bytes:
    """Run ``skopeo ARGS``; return stdout or raise the typed error."""
    status, out, err = await run(["skopeo", *args])
    if status != 0:
        raise skopeo_error(err, reference)
    return out


async def checked(argv: Sequence[str], *, reference: str, what: str) -> None:
    """Run ``argv`` (umoci, mkfs.ext4); raise :class:`UnpackError` on failure."""
    status, _out, err = await run(argv)
    if status != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        raise UnpackError(f"{what} failed ({status}): {lines[-1] if lines else 'no message'}",
                          reference=reference)
