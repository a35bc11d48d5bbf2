"""Errors of the VM runtime::

    FerryError
    └── VMError                     a QEMU VM could not do what was asked (.vm)
        ├── VMStateError            the call is invalid in the VM's lifecycle state
        ├── VMExitedError           the QEMU process is gone (.returncode, .stderr_tail)
        └── DeviceStateError        saving or loading the device state failed

QMP failures (:mod:`ferry.qemu.qmp.errors`) that are not caused by QEMU dying
propagate unchanged; a lost QMP connection of a dead QEMU becomes
:class:`VMExitedError`.
"""

from __future__ import annotations

from ferry.errors import FerryError


class VMError(FerryError):
    """A QEMU VM could not do what was asked."""

    def __init__(self, message: str, *, vm: str) -> None:
        super().__init__(f"vm {vm}: {message}")
        self.vm = vm


class VMStateError(VMError):
    """The operation is not valid in the VM's current lifecycle state."""


class VMExitedError(VMError):
    """The QEMU process exited (crashed, was killed, or the guest powered off)."""

    def __init__(self, message: str, *, vm: str, returncode: int | None,
                 stderr_tail: str = "") -> None:
        detail = f"{message} (exit status {returncode})"
        if stderr_tail:
            detail += f"; QEMU said: {stderr_tail}"
        super().__init__(detail, vm=vm)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class DeviceStateError(VMError):
    """QEMU's device state could not be saved or loaded."""
