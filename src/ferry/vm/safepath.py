"""Joining a name a peer chose onto a directory of ours, without leaving that directory.

A migration peer or a registry client names files: boot files by SHA-256,
package files by name, manifest paths of kernel and initramfs. Each such name
meets a host path only through :func:`safe_join`, which resolves the result
(symbolic links included) and refuses anything that is not strictly inside the
root, so ``../../etc/shadow``, an absolute path or a link planted in the tree
cannot reach outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ferry.errors import RemoteProtocolError

MAX_NAME_BYTES = 1024
"""A peer-supplied relative path longer than this is refused before touching the disk."""


class UnsafePathError(RemoteProtocolError):
    """A peer-supplied name would resolve outside the directory it belongs in."""


def safe_join(root: Path, name: str) -> Path:
    """``root / name``, resolved, if it lies strictly inside ``root``; else UnsafePathError.

    ``name`` is relative (``a/b`` allowed, ``..``, absolute paths, NUL and empty
    components refused before any resolution). The returned path is the
    resolved one, so a later open cannot be redirected by a symbolic link that
    existed when it was checked.
    """
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "replace")) \
            > MAX_NAME_BYTES or "\0" in name:
        raise UnsafePathError(f"unsafe name {name!r:.80}: empty, too long or not text")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"unsafe name {name!r:.80}: must be relative without '.' or '..'")
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / name))
    if target == base or base not in target.parents:
        raise UnsafePathError(f"{name!r:.80} resolves outside {root}")
    return target
