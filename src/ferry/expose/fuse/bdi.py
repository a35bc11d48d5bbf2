"""Per-mount writeback limits of a FUSE filesystem (``/sys/class/bdi/<maj:min>/``).

The kernel gives every FUSE mount a *strict* dirty limit of 1 % of the global
dirty threshold (``max_ratio=1``, ``strict_limit=1``; about 50 MB on a 24 GiB
machine). A guest whose RAM lives on the mount and dirties memory faster than
the daemon writes it back is then throttled to the daemon's speed inside its
page faults. Raising the limit lets dirty pages collect in the page cache,
where they cost nothing until the next flush; the price is a bigger flush.

Files used (kernel 6.x): ``max_ratio`` (percent), ``max_ratio_fine`` (parts
per million, used to restore exactly), ``max_bytes`` (absolute, converted by
the kernel into a ratio), ``strict_limit`` (0/1) and ``read_ahead_kb``.
Missing files are skipped, so older kernels get what they support.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError

log = logging.getLogger(__name__)

BDI_ROOT = Path("/sys/class/bdi")


@dataclass(frozen=True, slots=True)
class BdiTuning:
    """Writeback limits to apply to a mount; ``None`` leaves a value alone.

    The defaults lift the per-mount cap to the whole global dirty threshold and
    drop the strict limit, so the mount is throttled like any local disk.
    ``read_ahead_kb`` is left at the kernel's 128 KiB: measured here, 1 MiB
    readahead made cold sequential reads 2-4x *slower* (one 1 MiB request at
    a time instead of several 128 KiB ones in flight).
    """

    max_ratio_percent: int | None = 100
    max_bytes: int | None = None
    strict_limit: bool | None = False
    read_ahead_kb: int | None = None

    def __post_init__(self) -> None:
        if self.max_ratio_percent is not None and not 0 < self.max_ratio_percent <= 100:
            raise ConfigError("max_ratio_percent must be in 1..100")
        if self.max_ratio_percent is not None and self.max_bytes is not None:
            raise ConfigError("set max_ratio_percent or max_bytes, not both")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError("max_bytes must be positive")
        if self.read_ahead_kb is not None and self.read_ahead_kb < 0:
            raise ConfigError("read_ahead_kb must be >= 0")


NO_TUNING = BdiTuning(max_ratio_percent=None, strict_limit=None, read_ahead_kb=None)
"""Leave the kernel's defaults in place."""


def bdi_dir(dev: int) -> Path:
    """The sysfs directory of the backing-device info of the filesystem on ``dev``.

    ``dev`` is a ``st_dev`` value. For a FUSE mount prefer the number from
    ``/proc/self/mountinfo``: a ``stat`` of the mountpoint is a FUSE request
    and blocks until the daemon answers it.
    """
    return BDI_ROOT / f"{os.major(dev)}:{os.minor(dev)}"


def read_values(directory: Path) -> dict[str, str]:
    """Every tunable value present in ``directory`` (for reports and tests)."""
    names = ("max_ratio", "max_ratio_fine", "max_bytes", "strict_limit", "read_ahead_kb")
    return {n: (directory / n).read_text().strip() for n in names if (directory / n).exists()}


class BdiTuner:
    """Applies a :class:`BdiTuning` to one bdi and puts the old values back.

    ``apply()`` records each value before changing it; ``restore()`` writes
    the recorded values back in reverse order and tolerates the directory
    having vanished (the bdi goes away with the last reference to the mount).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._saved: list[tuple[str, str]] = []

    def _write(self, name: str, value: str) -> bool:
        path = self.directory / name
        if not path.exists():
            log.debug("%s: no %s on this kernel, skipped", self.directory, name)
            return False
        old = path.read_text().strip()
        # Restore ratios through max_ratio_fine when available: max_ratio and
        # max_bytes round, the parts-per-million value does not.
        if name in ("max_ratio", "max_bytes") and (self.directory / "max_ratio_fine").exists():
            self._saved.append(("max_ratio_fine",
                                (self.directory / "max_ratio_fine").read_text().strip()))
        else:
            self._saved.append((name, old))
        path.write_text(value)
        log.info("%s/%s: %s -> %s", self.directory, name, old, value)
        return True

    def apply(self, tuning: BdiTuning) -> None:
        """Write the requested values; on failure put back what was changed."""
        try:
            if tuning.strict_limit is not None:
                self._write("strict_limit", "1" if tuning.strict_limit else "0")
            if tuning.max_ratio_percent is not None:
                self._write("max_ratio", str(tuning.max_ratio_percent))
            if tuning.max_bytes is not None:
                self._write("max_bytes", str(tuning.max_bytes))
            if tuning.read_ahead_kb is not None:
                self._write("read_ahead_kb", str(tuning.read_ahead_kb))
        except OSError as exc:
            self.restore()
            raise ConfigError(f"cannot tune {self.directory}: {exc}") from exc

    def restore(self) -> None:
        """Put back every value ``apply`` changed (idempotent, never raises)."""
        while self._saved:
            name, value = self._saved.pop()
            try:
                (self.directory / name).write_text(value)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("could not restore %s/%s=%s: %s",
                                self.directory, name, value, exc)
