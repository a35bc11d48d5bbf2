"""Errors of the VM lifecycle (snapshot, package cache, runner, supervisor, control).

::

    FerryError
    ├── ConfigError
    │   └── VMSpecError              bad VM id, publish spec, or options
    └── VMLifecycleError             a lifecycle step failed (.vm)
        ├── ManifestError            a package's VM manifest is missing or invalid
        ├── SnapshotError            booting, readiness or saving a snapshot failed
        ├── VMNotFoundError          no such VM (running or suspended)
        ├── VMExistsError            a VM with this id already runs or is suspended
        ├── DeviceSetError           a VM's devices are not memory, disks and at most one state
        └── ControlError             the supervisor's control socket failed or said no
"""

from __future__ import annotations

from ferry.errors import ConfigError, FerryError


class VMSpecError(ConfigError):
    """A VM id, ``--publish`` spec or another option is invalid."""


class VMLifecycleError(FerryError):
    """A step of a VM's lifecycle failed."""

    def __init__(self, message: str, *, vm: str | None = None) -> None:
        super().__init__(f"vm {vm}: {message}" if vm else message)
        self.vm = vm


class ManifestError(VMLifecycleError):
    """A package's ``manifest.json`` is missing, of another format, or invalid."""


class SnapshotError(VMLifecycleError):
    """The guest did not become ready, or saving it failed."""


class VMNotFoundError(VMLifecycleError):
    """No running or suspended VM has this id."""


class VMExistsError(VMLifecycleError):
    """A VM with this id is already running (or suspended from another package)."""


class DeviceSetError(VMLifecycleError):
    """A set of devices does not describe one VM: exactly one ``memory``, at most one
    ``state`` and otherwise ``disk/<name>``."""


class ControlError(VMLifecycleError):
    """The supervisor's control socket could not be reached or reported an error."""
