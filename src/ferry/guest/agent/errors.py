"""Errors of the guest agent client.

::

    FerryError
    └── AgentError                    the guest agent failed or could not be reached
        ├── AgentConnectError         the agent's UNIX socket refused or timed out
        ├── AgentTimeoutError         no answer within the call's deadline (also a DeadlineError)
        ├── AgentDisconnectedError    the connection ended while calls were pending
        ├── AgentRemoteError          the agent answered with an ERROR frame (.code)
        ├── AgentHookError            a suspend/resume hook failed in the guest (.report)
        ├── AgentUnsupportedError     the guest's agent is too old for the request
        ├── AgentRequestError         we tried to send something too large (LocalProtocolError)
        └── AgentProtocolError        the agent sent malformed bytes (RemoteProtocolError)
            └── AgentFrameTooLargeError   a frame exceeded the size cap (FrameTooLargeError)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferry.errors import (
    DeadlineError,
    FerryError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    from ferry.guest.agent.protocol import ErrorCode, HooksResult


class AgentError(FerryError):
    """The guest agent failed, misbehaved or could not be reached."""


class AgentConnectError(AgentError):
    """Connecting to the agent's socket failed (QEMU not running, wrong path)."""


class AgentTimeoutError(AgentError, DeadlineError):
    """The agent did not answer a call within its deadline."""

    def __init__(self, operation: str, timeout_s: float) -> None:
        super().__init__(f"agent did not answer {operation} within {timeout_s:.1f} s")
        self.operation = operation
        self.timeout_s = timeout_s


class AgentDisconnectedError(AgentError):
    """The connection to the agent ended (or was closed) while a call was pending."""


class AgentRemoteError(AgentError):
    """The agent answered a request with an ERROR frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"agent error {code.name}: {message}")
        self.code = code
        self.message = message


class AgentHookError(AgentError):
    """A before-suspend or after-resume hook exited non-zero or timed out."""

    def __init__(self, message: str, report: HooksResult) -> None:
        super().__init__(message)
        self.report = report


class AgentUnsupportedError(AgentError):
    """The guest's agent speaks an older protocol that lacks the request (sessions)."""


class AgentRequestError(AgentError, LocalProtocolError):
    """A request we tried to send breaks the protocol's limits (our side's fault)."""


class AgentProtocolError(AgentError, RemoteProtocolError):
    """The agent sent malformed or unexpected bytes."""


class AgentFrameTooLargeError(AgentProtocolError, FrameTooLargeError):
    """A frame announced a payload larger than the size cap."""
