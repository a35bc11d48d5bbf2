"""Errors of the FUSE exposure layer::

    FerryError
    └── FuseError                   the FUSE layer failed
        ├── MountError              mounting, or cleaning up a mountpoint, failed (.mountpoint)
        │   └── SessionBusyError    this process already serves a FUSE mount (pyfuse3 limit)
        ├── DaemonError             the FUSE main loop stopped with an error
        └── FlushError              fsync through the mount failed (.name)
"""

from __future__ import annotations

from ferry.errors import FerryError


class FuseError(FerryError):
    """The FUSE layer failed."""


class MountError(FuseError):
    """Mounting, unmounting or cleaning up a mountpoint failed."""

    def __init__(self, message: str, *, mountpoint: str) -> None:
        super().__init__(f"{mountpoint}: {message}")
        self.mountpoint = mountpoint


class SessionBusyError(MountError):
    """pyfuse3 keeps one session per process and it is already in use."""


class DaemonError(FuseError):
    """pyfuse3's main loop stopped with an error; the mount no longer answers."""


class FlushError(FuseError):
    """Writing the page cache back through the daemon failed."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
