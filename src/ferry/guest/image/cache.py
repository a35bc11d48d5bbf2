"""Where built artefacts live between runs.

The cache directory is the host's ``HostConfig.cache_root`` (``$FERRY_CACHE_DIR``,
else ``~/.cache/ferry``; see :mod:`ferry.hostconfig`), passed in by the caller.
Entries are directories completed atomically: they are built under a
temporary name and renamed into place, so a crashed build never leaves a
half-written entry that a later run would mistake for a hit.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``final`` if the block succeeds.

    If another process finished the same entry meanwhile, ours is discarded:
    entries are keyed by content, so both are equal.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    scratch.chmod(0o755)  # mkdtemp's 0700 would hide the entry from other users
    try:
        yield scratch
        try:
            scratch.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
