"""Errors of the NBD server.

::

    FerryError
    └── NBDError                       the NBD server or a client connection failed
        ├── NBDRemoteProtocolError     the client sent malformed or unexpected bytes
        │   ├── NBDOptionTooLargeError an option announced more data than we accept
        │   └── NBDTLSRequiredError    NBD_OPT_EXPORT_NAME before TLS on a TLS-only server
        ├── NBDTLSError                the TLS handshake was refused or the TLS stream broke
        ├── NBDLocalProtocolError      we tried to send something invalid (our bug)
        ├── NBDUnknownExportError      NBD_OPT_EXPORT_NAME named no export (.export)
        ├── NBDReplyAbortedError       a read reply broke off after its header was sent
        └── NBDServeError              a listening socket could not be set up (.address)

Every one of them ends the client connection it concerns (a hard disconnect,
as the spec allows on a violated MUST); the server keeps serving the others.
"""

from __future__ import annotations

from ferry.errors import FerryError


class NBDError(FerryError):
    """The NBD server or one client connection failed."""


class NBDRemoteProtocolError(NBDError):
    """The client sent malformed, oversized or unexpected bytes."""


class NBDOptionTooLargeError(NBDRemoteProtocolError):
    """An option announced a payload larger than the server accepts."""


class NBDTLSRequiredError(NBDRemoteProtocolError):
    """The client chose an export with NBD_OPT_EXPORT_NAME before starting TLS.

    The server requires TLS, and that option cannot carry the
    NBD_REP_ERR_TLS_REQD other options get, so the spec makes the server
    drop the connection.
    """


class NBDTLSError(NBDError):
    """TLS on one client connection failed.

    The handshake was refused (a certificate not signed by our CA, no
    certificate, no common protocol version) or timed out, or a TLS record
    arrived corrupt. After the NBD_REP_ACK to NBD_OPT_STARTTLS there is no
    way back to plaintext, so the connection ends.
    """


class NBDHandshakeTimeoutError(NBDError):
    """A client did not finish the handshake (options, TLS) within the deadline."""


class NBDLocalProtocolError(NBDError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class NBDUnknownExportError(NBDError):
    """The client chose, with NBD_OPT_EXPORT_NAME, an export that does not exist.

    That option cannot carry an error reply, so the spec makes the server
    drop the connection.
    """

    def __init__(self, export: str) -> None:
        super().__init__(f"no export named {export!r}")
        self.export = export


class NBDReplyAbortedError(NBDError):
    """A read reply could not be finished after its header had gone out.

    Raised when the file behind a device ends early (it was truncated) while
    its data is being sent straight from the file: the client already holds
    a header promising more bytes, so the only way out is to drop the
    connection.
    """


class NBDServeError(NBDError):
    """A listening socket could not be bound."""

    def __init__(self, message: str, *, address: str) -> None:
        super().__init__(f"{message} ({address})")
        self.address = address
