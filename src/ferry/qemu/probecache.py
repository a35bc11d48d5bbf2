"""What a probe of this host's QEMU found, kept for the rest of the host's boot.

Probes start QEMU (the accelerator probe boots a guest, the sandbox probe
starts ``-M none``): tens of milliseconds to seconds that every ``ferry``
command would otherwise pay again. Results live in JSON files under the
machine's run root (``/run/ferry``, a tmpfs: gone at reboot), keyed by
:func:`host_key`: the boot, the host kernel and the QEMU binary (path, size,
mtime), plus whatever else the probe depends on. A file whose key differs, or
that cannot be read, is a miss; writes are atomic (rename).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def binary_ident(path: str | Path) -> str:
    """A QEMU binary's identity: resolved path, size and mtime ("...:missing" if absent)."""
    try:
        st = Path(path).stat()
    except OSError:
        return f"{path}:missing"
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def host_key(qemu: str, **extra: str) -> dict[str, str]:
    """This boot, the host kernel, ``qemu`` (looked up on PATH) and ``extra``."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    uname = os.uname()
    return {"boot_id": boot_id, "host_kernel": f"{uname.release} {uname.version}",
            "qemu": binary_ident(shutil.which(qemu) or qemu), **extra}


def read(path: Path, key: dict[str, str]) -> dict[str, Any] | None:
    """The result stored under ``key`` in ``path``, or None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    return data


def write(path: Path, key: dict[str, str], result: dict[str, Any]) -> None:
    """Store ``result`` under ``key`` (best effort: a probe result is only a shortcut)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, **result}) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot cache a probe result in %s: %s", path, exc)
