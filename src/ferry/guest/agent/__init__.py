"""The guest agent's host side: a sans-IO codec, an asyncio client, the image hooks.

The agent itself is C (``ferry/guest/files/agent/agent.c``), compiled into every
image whose blueprint keeps ``[agent] enabled = true`` (the default). See
docs/agent.md. Public API::

    connect_agent(socket_path, *, connect_timeout_s) -> async context of AgentClient
    open_agent(stream) -> async context of AgentClient     (any ferry Stream)
    AgentClient.wait_ready(timeout_s) -> Hello
    AgentClient.ping(timeout_s) -> Pong
    AgentClient.exec(argv | shell_command, *, stdin, timeout_s, max_output_bytes) -> ExecResult
    AgentClient.session(argv | shell_command, *, tty, rows, cols, term) -> async context of
        AgentSession: read() -> SessionOutput | None, write(bytes), close_stdin(),
        resize(rows, cols), signal(n), wait() -> SessionExit
    AgentClient.before_suspend(timeout_s, *, check) -> HooksResult
    AgentClient.after_resume(timeout_s, *, host_time_ns, check) -> HooksResult
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
    from ferry.guest.agent.client import ANSWER_GRACE_S, AgentClient, connect_agent, open_agent
    from ferry.guest.agent.errors import (
        AgentConnectError,
        AgentDisconnectedError,
        AgentError,
        AgentFrameTooLargeError,
        AgentHookError,
        AgentProtocolError,
        AgentRemoteError,
        AgentRequestError,
        AgentTimeoutError,
        AgentUnsupportedError,
    )
    from ferry.guest.agent.hooks import AgentSpec
    from ferry.guest.agent.protocol import (
        ErrorCode,
        ExecOutcome,
        ExecResult,
        Hello,
        HookResult,
        HooksResult,
        OutputStream,
        Pong,
        SessionExit,
        SessionOutput,
    )
    from ferry.guest.agent.session import AgentSession

__all__ = [
    "ANSWER_GRACE_S",
    "AgentClient",
    "AgentConnectError",
    "AgentDisconnectedError",
    "AgentError",
    "AgentFrameTooLargeError",
    "AgentHookError",
    "AgentProtocolError",
    "AgentRemoteError",
    "AgentRequestError",
    "AgentSession",
    "AgentSpec",
    "AgentTimeoutError",
    "AgentUnsupportedError",
    "ErrorCode",
    "ExecOutcome",
    "ExecResult",
    "Hello",
    "HookResult",
    "HooksResult",
    "OutputStream",
    "Pong",
    "SessionExit",
    "SessionOutput",
    "connect_agent",
    "open_agent",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "ANSWER_GRACE_S": "ferry.guest.agent.client",
    "AgentClient": "ferry.guest.agent.client",
    "connect_agent": "ferry.guest.agent.client",
    "open_agent": "ferry.guest.agent.client",
    "AgentConnectError": "ferry.guest.agent.errors",
    "AgentDisconnectedError": "ferry.guest.agent.errors",
    "AgentError": "ferry.guest.agent.errors",
    "AgentFrameTooLargeError": "ferry.guest.agent.errors",
    "AgentHookError": "ferry.guest.agent.errors",
    "AgentProtocolError": "ferry.guest.agent.errors",
    "AgentRemoteError": "ferry.guest.agent.errors",
    "AgentRequestError": "ferry.guest.agent.errors",
    "AgentTimeoutError": "ferry.guest.agent.errors",
    "AgentUnsupportedError": "ferry.guest.agent.errors",
    "AgentSpec": "ferry.guest.agent.hooks",
    "ErrorCode": "ferry.guest.agent.protocol",
    "ExecOutcome": "ferry.guest.agent.protocol",
    "ExecResult": "ferry.guest.agent.protocol",
    "Hello": "ferry.guest.agent.protocol",
    "HookResult": "ferry.guest.agent.protocol",
    "HooksResult": "ferry.guest.agent.protocol",
    "OutputStream": "ferry.guest.agent.protocol",
    "Pong": "ferry.guest.agent.protocol",
    "SessionExit": "ferry.guest.agent.protocol",
    "SessionOutput": "ferry.guest.agent.protocol",
    "AgentSession": "ferry.guest.agent.session",
})
