"""QMP, QEMU's JSON monitor protocol: a sans-IO core and an asyncio client.

Public API::

    qmp = await QMPClient.connect_unix(path, name="vm1")   # greeting + qmp_capabilities
    result = await qmp.execute("query-status", timeout_s=5)
    mark = qmp.event_mark(); await qmp.execute("cont")
    await qmp.wait_event("RESUME", since=mark, timeout_s=5)
    await qmp.close()

Errors (:mod:`ferry.qemu.qmp.errors`): QMPCommandError (.error_class, .desc),
QMPConnectionError, QMPTimeoutError, QMPProtocolError, QMPStateError.
"""

from ferry.qemu.qmp.client import DEFAULT_TIMEOUT_S, ClientState, EventRecord, QMPClient
from ferry.qemu.qmp.errors import (
    QMPCommandError,
    QMPCommandNotFoundError,
    QMPConnectionError,
    QMPError,
    QMPProtocolError,
    QMPStateError,
    QMPTimeoutError,
)
from ferry.qemu.qmp.protocol import (
    MAX_MESSAGE_BYTES,
    ErrorReply,
    Event,
    Greeting,
    QMPProtocol,
    QMPState,
    Reply,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_MESSAGE_BYTES",
    "ClientState",
    "ErrorReply",
    "Event",
    "EventRecord",
    "Greeting",
    "QMPClient",
    "QMPCommandError",
    "QMPCommandNotFoundError",
    "QMPConnectionError",
    "QMPError",
    "QMPProtocol",
    "QMPProtocolError",
    "QMPState",
    "QMPStateError",
    "QMPTimeoutError",
    "Reply",
]
