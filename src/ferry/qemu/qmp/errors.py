"""Errors of the QMP client::

    FerryError
    └── QMPError                      talking to QEMU's monitor failed
        ├── QMPCommandError           QEMU answered a command with an error (.command,
        │   │                         .error_class, .desc)
        │   └── QMPCommandNotFoundError   the command does not exist in this QEMU
        ├── QMPProtocolError          QEMU sent something that is not QMP (our peer's fault)
        ├── QMPStateError             a call is invalid in the client's state (our fault)
        ├── QMPConnectionError        cannot connect, or the connection was lost
        └── QMPTimeoutError           no answer in time (also a DeadlineError)
"""

from __future__ import annotations

from ferry.errors import DeadlineError, FerryError


class QMPError(FerryError):
    """Talking to QEMU's monitor failed."""


class QMPCommandError(QMPError):
    """QEMU executed ``command`` and answered with an error object."""

    def __init__(self, *, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPCommandNotFoundError(QMPCommandError):
    """The command is unknown to this QEMU (error class ``CommandNotFound``)."""


class QMPProtocolError(QMPError):
    """QEMU sent a malformed, oversized or unexpected message."""


class QMPStateError(QMPError):
    """The call is not valid in the client's current state (a caller bug)."""


class QMPConnectionError(QMPError):
    """The monitor socket could not be reached, or the connection was lost."""


class QMPTimeoutError(QMPError, DeadlineError):
    """A command reply or an event did not arrive within its deadline."""


def command_error(command: str, error_class: str, desc: str) -> QMPCommandError:
    """The most precise :class:`QMPCommandError` subclass for ``error_class``."""
    cls = QMPCommandNotFoundError if error_class == "CommandNotFound" else QMPCommandError
    return cls(command=command, error_class=error_class, desc=desc)
