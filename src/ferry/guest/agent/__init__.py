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
