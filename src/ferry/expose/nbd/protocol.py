"""Sans-IO server side of the NBD protocol (fixed newstyle, structured replies).

Theory of operation
-------------------
:class:`ServerConnection` turns the bytes a client sends into typed events and
builds the bytes of every reply; it never touches a socket or an event loop
(like h11). The I/O wrapper (:mod:`ferry.expose.nbd.server`) loops::

    send(conn.data_to_send())                 # greeting, option replies
    n = recv_into(conn.get_buffer())          # or conn.receive_data(bytes)
    conn.buffer_updated(n)
    while (event := conn.next_event()) is not Signal.NEED_DATA: ...

The handshake (option haggling) is answered by the core itself from the
export catalogue it was given, because every answer follows from that
catalogue; the wrapper only sees :class:`OptionReceived` (for tracing) and
then :class:`ExportSelected` or :class:`HandshakeAborted`. In transmission
each request becomes one event; requests the core can judge invalid on
their own (unknown command or flag, range outside the export, write to a
read-only export, too long) become :class:`RejectedRequest` carrying the
error to reply with. A WRITE's payload is received straight into a buffer
of its final size (``get_buffer`` hands it out), so a 1 MiB write is copied
once, from the kernel. The payload of a rejected write is skipped without
being stored.

Phases:
``CLIENT_FLAGS -> OPTIONS -> TRANSMISSION -> CLOSED``; ``OPTIONS -> CLOSED`` on
NBD_OPT_ABORT; any protocol violation raises :class:`NBDRemoteProtocolError`
and the wrapper hard-disconnects.

TLS. A core made with ``TLSMode.REQUIRED`` is the spec's FORCEDTLS server:
until TLS is up it answers every option but NBD_OPT_STARTTLS and
NBD_OPT_ABORT with NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which
cannot carry an error) raises :class:`NBDTLSRequiredError`. NBD_OPT_STARTTLS
queues NBD_REP_ACK and yields :class:`TLSRequested`; the phase becomes
``STARTING_TLS``, where the core parses nothing. The wrapper sends the ACK,
runs the TLS handshake on the socket, feeding it first the bytes
:meth:`ServerConnection.take_unparsed` returns (a client may send its TLS
hello right behind the option), then calls
:meth:`ServerConnection.tls_established` and from then on feeds the core
decrypted bytes: ``OPTIONS -> STARTING_TLS -> OPTIONS``. The core never sees
ciphertext. With ``TLSMode.NONE`` (the default, and always on UNIX sockets)
NBD_OPT_STARTTLS gets NBD_REP_ERR_UNSUP.

Wire format (all integers big-endian)::

    greeting   S: "NBDMAGIC" "IHAVEOPT" u16 handshake-flags
               C: u32 client-flags
    option     C: "IHAVEOPT" u32 option  u32 length  data[length]
    opt reply  S: u64 0x3e889045565a9  u32 option  u32 type  u32 length  data
    request    C: u32 0x25609513 u16 flags u16 type u64 handle u64 offset u32 length
                  [data[length] for WRITE]
    simple     S: u32 0x67446698 u32 error u64 handle [data for a successful READ]
    chunk      S: u32 0x668e33ef u16 flags u16 type u64 handle u32 length payload

Spec: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ferry.buffers import Buffer
from ferry.expose.nbd.errors import (
    NBDLocalProtocolError,
    NBDOptionTooLargeError,
    NBDRemoteProtocolError,
    NBDTLSRequiredError,
    NBDUnknownExportError,
)

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_OPTION_BYTES = 64 * 1024
"""Largest option payload accepted. The biggest legal one (NBD_OPT_GO) is a
4096-byte name plus a short list of info requests; 64 KiB leaves room for
future options while bounding what an unauthenticated client can make us hold."""

MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
"""Largest READ/WRITE length served, advertised as the maximum block size.
32 MiB is what qemu-nbd and nbdkit advertise, so clients already split to it."""

MAX_OPTIONS = 1024
"""Options accepted before transmission; a client looping forever in option
haggling is a denial of service the spec lets us end with a hard disconnect."""

MAX_STRING_BYTES = 4096
"""The spec's hard limit for export names and messages."""

_SCRATCH_BYTES = MAX_OPTION_BYTES + 64 * 1024
"""Receive buffer for headers and options: big enough for the largest option
with its header, and large enough that small requests arrive many per recv."""

_MAX_SPARES = 4
"""Write buffers kept for reuse per connection (at most 4 x 32 MiB held idle)."""

_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_CHUNK_DATA_HEADER = struct.Struct(">IHHQIQ")
_ERROR_PAYLOAD = struct.Struct(">IH")


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


_FUA = int(CommandFlag.FUA)
_DF = int(CommandFlag.DF)
_ALLOWED_FLAGS: dict[int, int] = {
    # FUA is valid on every command once SEND_FUA is offered; DF is added
    # for READ when structured replies are on.
    Command.READ: _FUA,
    Command.WRITE: _FUA,
    Command.FLUSH: _FUA,
    Command.TRIM: _FUA,
    Command.CACHE: _FUA,
    Command.WRITE_ZEROES: _FUA | int(CommandFlag.NO_HOLE),
}
_COMMAND_FLAGS = {bits: CommandFlag(bits) for bits in range(int(max(CommandFlag)) * 2)}
"""Every combination of known flags, built once: CommandFlag(bits) per request
costs as much as parsing the rest of the header."""


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


class Errno(enum.IntEnum):
    """Error values the spec allows on the wire (not the host's errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class Phase(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    STARTING_TLS = "starting-tls"
    """NBD_OPT_STARTTLS was acknowledged; waiting for ``tls_established()``."""
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class TLSMode(enum.Enum):
    """Whether a connection must upgrade to TLS (the spec's server modes)."""

    NONE = "none"
    """NOTLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_UNSUP."""
    REQUIRED = "required"
    """FORCEDTLS: nothing but NBD_OPT_STARTTLS and NBD_OPT_ABORT before TLS."""


class Signal(enum.Enum):
    """Non-event results of :meth:`ServerConnection.next_event`."""

    NEED_DATA = "need-data"
    """Feed more bytes before another event can be parsed."""
    CLOSED = "closed"
    """The client closed the stream cleanly, or the session ended (ABORT, DISC)."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    size_bytes: int
    read_only: bool = False
    description: str = ""
    block_size_bytes: int = 4096

    def __post_init__(self) -> None:
        if self.size_bytes < 0:
            raise ValueError("size_bytes must be >= 0")
        bs = self.block_size_bytes
        if bs <= 0 or bs & (bs - 1) or bs > MAX_PAYLOAD_BYTES:
            raise ValueError("block_size_bytes must be a power of two <= 32 MiB")
        if len(self.description.encode()) > MAX_STRING_BYTES:
            raise ValueError("description longer than 4096 bytes")


# --- events ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionReceived:
    """An option arrived during haggling (the core has queued its reply)."""

    option: int
    length: int


@dataclass(frozen=True, slots=True)
class ExportSelected:
    """Haggling ended with NBD_OPT_GO or NBD_OPT_EXPORT_NAME; transmission begins."""

    name: str
    info: ExportInfo
    structured_replies: bool


@dataclass(frozen=True, slots=True)
class HandshakeAborted:
    """The client sent NBD_OPT_ABORT; the ACK is queued, then close the connection."""


@dataclass(frozen=True, slots=True)
class TLSRequested:
    """The client sent NBD_OPT_STARTTLS and its NBD_REP_ACK is queued.

    Send the ACK, run the TLS handshake (server side) starting with the
    bytes of :meth:`ServerConnection.take_unparsed`, then call
    :meth:`ServerConnection.tls_established`.
    """


@dataclass(frozen=True, slots=True)
class ReadRequest:
    handle: int
    offset: int
    length: int
    flags: CommandFlag


@dataclass(frozen=True, slots=True)
class WriteRequest:
    handle: int
    offset: int
    data: bytearray
    flags: CommandFlag

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class FlushRequest:
    handle: int
    flags: CommandFlag


@dataclass(frozen=True, slots=True)
class TrimRequest:
    handle: int
    offset: int
    length: int
    flags: CommandFlag


@dataclass(frozen=True, slots=True)
class WriteZeroesRequest:
    handle: int
    offset: int
    length: int
    flags: CommandFlag


@dataclass(frozen=True, slots=True)
class CacheRequest:
    handle: int
    offset: int
    length: int
    flags: CommandFlag


@dataclass(frozen=True, slots=True)
class DisconnectRequest:
    """NBD_CMD_DISC: finish outstanding requests, then close. No reply."""


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    """A request the core judged invalid; reply with ``error`` (never to the device)."""

    handle: int
    command: int
    offset: int
    length: int
    error: Errno
    message: str


Request = (
    ReadRequest
    | WriteRequest
    | FlushRequest
    | TrimRequest
    | WriteZeroesRequest
    | CacheRequest
    | RejectedRequest
)
Event = (
    OptionReceived | ExportSelected | HandshakeAborted | TLSRequested | Request | DisconnectRequest
)


def transmission_flags(info: ExportInfo, structured_replies: bool) -> TransmissionFlag:
    """The transmission flags advertised for an export.

    CAN_MULTI_CONN is honest because every connection of an export shares
    one device and FLUSH waits for the writes of all of them.
    """
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.CAN_MULTI_CONN
        | TransmissionFlag.SEND_CACHE
    )
    if info.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= (
            TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
        )
    if structured_replies:
        flags |= TransmissionFlag.SEND_DF
    return flags


class ServerConnection:
    """The state of one client connection, fed bytes, yielding events."""

    def __init__(self, exports: Mapping[str, ExportInfo], *, tls: TLSMode = TLSMode.NONE) -> None:
        self._exports = dict(exports)
        self.tls_mode = tls
        self.tls_active = False
        """True once :meth:`tls_established` was called: the bytes fed are decrypted."""
        self.phase = Phase.CLIENT_FLAGS
        self.client_flags = ClientFlag(0)
        self.structured_replies = False
        self.export_name: str | None = None
        self.export: ExportInfo | None = None
        self._options_seen = 0
        self._eof = False
        self._out = bytearray()
        self._out += struct.pack(
            ">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        )
        # Receive side: scratch[_rd:_wr] holds unparsed bytes.
        self._scratch = bytearray(_SCRATCH_BYTES)
        self._rd = 0
        self._wr = 0
        # A WRITE whose payload is still arriving: header fields and buffer.
        self._payload: bytearray | None = None
        self._payload_filled = 0
        self._payload_request: tuple[int, int, CommandFlag] = (0, 0, CommandFlag(0))
        self._discard = 0  # bytes of a rejected WRITE's payload still to skip
        self._handed_out_payload = False
        self._spares: list[bytearray] = []

    # --- receiving ------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """A writable buffer for the next received bytes (``recv_into`` target).

        Call :meth:`buffer_updated` with the number of bytes written into it.
        While a WRITE's payload is pending, this is the rest of that payload's
        buffer, so the data lands in place.
        """
        payload = self._payload
        if payload is not None and self._rd == self._wr and self._payload_filled < len(payload):
            self._handed_out_payload = True
            return memoryview(payload)[self._payload_filled :]
        self._handed_out_payload = False
        if self._rd == self._wr:
            self._rd = self._wr = 0
        elif self._wr == len(self._scratch):
            if self._rd:
                pending = self._wr - self._rd
                self._scratch[:pending] = self._scratch[self._rd : self._wr]
                self._rd, self._wr = 0, pending
            else:  # only receive_data() fed faster than next_event() parses
                # A new buffer, not extend(): views handed out earlier pin the old one.
                self._scratch = self._scratch + bytes(len(self._scratch))
        return memoryview(self._scratch)[self._wr :]

    def buffer_updated(self, nbytes: int) -> None:
        """Record that ``nbytes`` were written into the last :meth:`get_buffer`."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if self._handed_out_payload:
            assert self._payload is not None
            if self._payload_filled + nbytes > len(self._payload):
                raise ValueError("more bytes than the buffer held")
            self._payload_filled += nbytes
        else:
            if self._wr + nbytes > len(self._scratch):
                raise ValueError("more bytes than the buffer held")
            self._wr += nbytes

    def receive_data(self, data: Buffer) -> None:
        """Feed received bytes; ``b""`` means the client closed its side."""
        view = memoryview(data).cast("B")
        if not view:
            self._eof = True
            return
        pos = 0
        while pos < len(view):
            if self._discard and self._rd == self._wr:
                # A rejected write's payload: skip it without buffering it.
                skip = min(self._discard, len(view) - pos)
                self._discard -= skip
                pos += skip
                continue
            with self.get_buffer() as target:
                n = min(len(target), len(view) - pos)
                target[:n] = view[pos : pos + n]
            self.buffer_updated(n)
            pos += n

    def receive_eof(self) -> None:
        """The client closed its sending side."""
        self._eof = True

    # --- sending ------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the core produced itself (greeting, option replies), then cleared."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # --- TLS upgrade ----------------------------------------------------------

    def take_unparsed(self) -> bytes:
        """Bytes received after NBD_OPT_STARTTLS: the start of the TLS handshake.

        Only valid in ``STARTING_TLS``; the buffer is left empty, ready for
        the decrypted bytes that follow the handshake.
        """
        self._require_starting_tls("take_unparsed")
        data = bytes(self._scratch[self._rd : self._wr])
        self._rd = self._wr = 0
        return data

    def tls_established(self) -> None:
        """The TLS handshake succeeded: option haggling resumes inside TLS.

        What was negotiated in plaintext is forgotten, as the spec asks
        (nothing can be, in ``REQUIRED`` mode).
        """
        self._require_starting_tls("tls_established")
        if self._rd != self._wr:
            raise NBDLocalProtocolError("plaintext bytes left over: call take_unparsed() first")
        self.tls_active = True
        self.structured_replies = False
        self.phase = Phase.OPTIONS

    def _require_starting_tls(self, what: str) -> None:
        if self.phase is not Phase.STARTING_TLS:
            raise NBDLocalProtocolError(f"{what}() outside phase starting-tls ({self.phase.value})")

    # --- parsing ------------------------------------------------------------

    def _available(self) -> int:
        return self._wr - self._rd

    def _take(self, n: int) -> memoryview:
        start = self._rd
        self._rd += n
        return memoryview(self._scratch)[start : start + n]

    def _need(self, n: int) -> bool:
        """True if ``n`` bytes are buffered; raise if the client closed before."""
        if self._available() >= n:
            return True
        if self._eof and self._available():
            raise NBDRemoteProtocolError(
                f"client closed the connection mid-message in phase {self.phase.value}"
            )
        return False

    def next_event(self) -> Event | Signal:
        """Parse the next event from buffered bytes, or return a :class:`Signal`."""
        while True:
            if self.phase is Phase.CLOSED:
                return Signal.CLOSED
            if self.phase is Phase.CLIENT_FLAGS:
                if not self._need(4):
                    return self._idle_signal()
                (flags,) = struct.unpack(">I", self._take(4))
                if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                    raise NBDRemoteProtocolError(f"unknown client flags {flags:#x}")
                self.client_flags = ClientFlag(flags)
                self.phase = Phase.OPTIONS
                continue
            if self.phase is Phase.OPTIONS:
                return self._next_option()
            if self.phase is Phase.STARTING_TLS:
                raise NBDLocalProtocolError(
                    "next_event() while TLS is starting: call tls_established() first"
                )
            return self._next_request()

    def _idle_signal(self) -> Signal:
        if self._eof:
            self.phase = Phase.CLOSED
            return Signal.CLOSED
        return Signal.NEED_DATA

    # --- option haggling ----------------------------------------------------

    def _next_option(self) -> Event | Signal:
        if not self._need(_OPTION_HEADER.size):
            return self._idle_signal()
        magic, option, length = _OPTION_HEADER.unpack_from(self._scratch, self._rd)
        if magic != IHAVEOPT:
            raise NBDRemoteProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_BYTES:
            raise NBDOptionTooLargeError(
                f"option {option} announced {length} bytes (limit {MAX_OPTION_BYTES})"
            )
        if not self._need(_OPTION_HEADER.size + length):
            if self._eof:
                raise NBDRemoteProtocolError("client closed the connection mid-option")
            return Signal.NEED_DATA
        self._rd += _OPTION_HEADER.size
        data = bytes(self._take(length))
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise NBDRemoteProtocolError(f"more than {MAX_OPTIONS} options")
        return self._handle_option(option, data)

    def _reply_option(self, option: int, reply: OptionReply, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _reply_option_error(self, option: int, reply: OptionReply, message: str) -> None:
        self._reply_option(option, reply, message.encode()[:MAX_STRING_BYTES])

    def _lookup(self, name: str) -> tuple[str, ExportInfo] | None:
        """Find an export; the empty (default) name picks the only export, if one."""
        if name in self._exports:
            return name, self._exports[name]
        if name == "" and len(self._exports) == 1:
            only = next(iter(self._exports))
            return only, self._exports[only]
        return None

    def _handle_option(self, option: int, data: bytes) -> Event:
        received = OptionReceived(option, len(data))
        if self.tls_mode is TLSMode.REQUIRED and not self.tls_active:
            refused = self._before_tls(option, data)
            if refused is not None:
                return refused
        elif option == Option.STARTTLS and self.tls_active:
            self._reply_option_error(option, OptionReply.ERR_INVALID, "TLS is already active")
            return received
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._reply_option(option, OptionReply.ACK)
            self.phase = Phase.CLOSED
            return HandshakeAborted()
        if option == Option.LIST:
            if data:
                self._reply_option_error(option, OptionReply.ERR_INVALID, "LIST takes no data")
                return received
            for name, info in self._exports.items():
                encoded = name.encode()
                self._reply_option(
                    option,
                    OptionReply.SERVER,
                    struct.pack(">I", len(encoded)) + encoded + info.description.encode(),
                )
            self._reply_option(option, OptionReply.ACK)
            return received
        if option == Option.STRUCTURED_REPLY:
            if data:
                self._reply_option_error(
                    option, OptionReply.ERR_INVALID, "STRUCTURED_REPLY takes no data"
                )
                return received
            self.structured_replies = True
            self._reply_option(option, OptionReply.ACK)
            return received
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(option, data) or received
        self._reply_option_error(option, OptionReply.ERR_UNSUP, f"option {option} not supported")
        return received

    def _before_tls(self, option: int, data: bytes) -> Event | None:
        """Answer ``option`` on a TLS-only connection before TLS; ``None``: handle as usual.

        Only NBD_OPT_ABORT is handled as usual.
        """
        if option == Option.ABORT:
            return None
        if option == Option.EXPORT_NAME:
            raise NBDTLSRequiredError(
                "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires TLS"
            )
        if option != Option.STARTTLS:
            self._reply_option_error(
                option, OptionReply.ERR_TLS_REQD, "TLS required: send NBD_OPT_STARTTLS first"
            )
            return OptionReceived(option, len(data))
        if data:
            self._reply_option_error(option, OptionReply.ERR_INVALID, "STARTTLS takes no data")
            return OptionReceived(option, len(data))
        self._reply_option(option, OptionReply.ACK)
        self.phase = Phase.STARTING_TLS
        return TLSRequested()

    def _export_name(self, data: bytes) -> ExportSelected:
        try:
            name = data.decode()
        except UnicodeDecodeError as exc:
            raise NBDRemoteProtocolError("export name is not UTF-8") from exc
        found = self._lookup(name)
        if found is None:
            raise NBDUnknownExportError(name)
        name, info = found
        flags = transmission_flags(info, self.structured_replies)
        self._out += struct.pack(">QH", info.size_bytes, flags)
        if not self.client_flags & ClientFlag.NO_ZEROES:
            self._out += bytes(124)
        return self._enter_transmission(name, info)

    def _enter_transmission(self, name: str, info: ExportInfo) -> ExportSelected:
        self.phase = Phase.TRANSMISSION
        self.export_name = name
        self.export = info
        return ExportSelected(name, info, self.structured_replies)

    def _info_or_go(self, option: int, data: bytes) -> ExportSelected | None:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; return the event if GO succeeded."""
        if len(data) < 6:
            self._reply_option_error(option, OptionReply.ERR_INVALID, "option data too short")
            return None
        (name_len,) = struct.unpack_from(">I", data, 0)
        if name_len > MAX_STRING_BYTES or 4 + name_len + 2 > len(data):
            self._reply_option_error(option, OptionReply.ERR_INVALID, "bad export name length")
            return None
        raw_name = data[4 : 4 + name_len]
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * count:
            self._reply_option_error(option, OptionReply.ERR_INVALID, "bad info request count")
            return None
        requests = struct.unpack_from(f">{count}H", data, 4 + name_len + 2)
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            self._reply_option_error(option, OptionReply.ERR_INVALID, "export name is not UTF-8")
            return None
        found = self._lookup(name)
        if found is None:
            self._reply_option_error(option, OptionReply.ERR_UNKNOWN, f"no export {name!r}")
            return None
        real_name, info = found
        flags = transmission_flags(info, self.structured_replies)
        self._reply_option(
            option, OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, info.size_bytes, flags)
        )
        if Info.NAME in requests:
            self._reply_option(
                option, OptionReply.INFO, struct.pack(">H", Info.NAME) + real_name.encode()
            )
        if Info.DESCRIPTION in requests:
            self._reply_option(
                option,
                OptionReply.INFO,
                struct.pack(">H", Info.DESCRIPTION) + info.description.encode(),
            )
        # Always sent: the minimum of 1 imposes nothing, and the maximum is a
        # limit the client must know whether or not it asked.
        self._reply_option(
            option,
            OptionReply.INFO,
            struct.pack(">HIII", Info.BLOCK_SIZE, 1, info.block_size_bytes, MAX_PAYLOAD_BYTES),
        )
        self._reply_option(option, OptionReply.ACK)
        if option == Option.GO:
            return self._enter_transmission(real_name, info)
        return None

    # --- transmission -------------------------------------------------------

    def _next_request(self) -> Event | Signal:
        if self._discard:
            skip = min(self._discard, self._available())
            self._rd += skip
            self._discard -= skip
            if self._discard:
                if self._eof:
                    raise NBDRemoteProtocolError("client closed the connection mid-write")
                return Signal.NEED_DATA
        if self._payload is not None:
            return self._continue_payload()
        if not self._need(_REQUEST.size):
            return self._idle_signal()
        magic, flag_bits, command, handle, offset, length = _REQUEST.unpack_from(
            self._scratch, self._rd
        )
        if magic != REQUEST_MAGIC:
            raise NBDRemoteProtocolError(f"bad request magic {magic:#x}")
        self._rd += _REQUEST.size
        if command == Command.DISC:
            self.phase = Phase.CLOSED
            return DisconnectRequest()
        problem = self._validate(command, flag_bits, offset, length)
        if problem is not None:
            error, message = problem
            if command == Command.WRITE:
                self._discard = length
            return RejectedRequest(handle, command, offset, length, error, message)
        flags = _COMMAND_FLAGS[flag_bits]  # _validate admitted only known bits
        if command == Command.WRITE:
            self._payload = self._new_payload(length)
            self._payload_filled = 0
            self._payload_request = (handle, offset, flags)
            return self._continue_payload()
        if command == Command.READ:
            return ReadRequest(handle, offset, length, flags)
        if command == Command.FLUSH:
            return FlushRequest(handle, flags)
        if command == Command.TRIM:
            return TrimRequest(handle, offset, length, flags)
        if command == Command.WRITE_ZEROES:
            return WriteZeroesRequest(handle, offset, length, flags)
        return CacheRequest(handle, offset, length, flags)

    def _new_payload(self, length: int) -> bytearray:
        for i, spare in enumerate(self._spares):
            if len(spare) == length:
                return self._spares.pop(i)
        return bytearray(length)

    def recycle(self, data: bytearray) -> None:
        """Give a finished WriteRequest's buffer back for the next write of its size.

        Allocating a fresh zero-filled megabyte per write cost more than
        receiving it; the caller must not use ``data`` afterwards.
        """
        if len(self._spares) < _MAX_SPARES and len(data) <= MAX_PAYLOAD_BYTES:
            self._spares.append(data)

    def _continue_payload(self) -> WriteRequest | Signal:
        payload = self._payload
        assert payload is not None
        move = min(len(payload) - self._payload_filled, self._available())
        if move:
            end = self._payload_filled + move
            payload[self._payload_filled : end] = self._take(move)
            self._payload_filled = end
        if self._payload_filled < len(payload):
            if self._eof:
                raise NBDRemoteProtocolError("client closed the connection mid-write")
            return Signal.NEED_DATA
        handle, offset, flags = self._payload_request
        self._payload = None
        return WriteRequest(handle, offset, payload, flags)

    def _validate(
        self, command: int, flag_bits: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        info = self.export
        assert info is not None
        # Plain ints rather than enum arithmetic: this runs once per request.
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return Errno.EINVAL, f"unsupported command {command}"
        if command == Command.READ and self.structured_replies:
            allowed |= _DF
        if flag_bits & ~allowed:
            return Errno.EINVAL, f"flags {flag_bits:#x} not valid for command {command}"
        writes = command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
        if writes and info.read_only:
            return Errno.EPERM, "export is read-only"
        if command == Command.FLUSH:
            return None
        if command in (Command.READ, Command.WRITE) and length > MAX_PAYLOAD_BYTES:
            return Errno.EINVAL, f"length {length} exceeds the {MAX_PAYLOAD_BYTES}-byte maximum"
        if offset + length > info.size_bytes:
            return (
                Errno.ENOSPC if writes else Errno.EINVAL,
                f"range [{offset}, {offset + length}) outside export of {info.size_bytes} bytes",
            )
        return None

    # --- replies --------------------------------------------------------------

    def reply_read(self, request: ReadRequest, data: Buffer) -> bytes:
        """Header to send just before ``data``, the successful result of ``request``.

        Returned apart from the data so a large read is never copied to be framed.
        """
        length = len(memoryview(data).cast("B"))
        if length != request.length:
            raise NBDLocalProtocolError(
                f"read reply of {length} bytes for a {request.length}-byte request"
            )
        return self.reply_read_header(request)

    def reply_read_header(self, request: ReadRequest) -> bytes:
        """The header of a successful reply to ``request``, whose data follows it.

        For a caller that sends the ``request.length`` data bytes itself (from
        a file with ``sendfile``); it must send exactly that many.
        """
        length = request.length
        if not self.structured_replies:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.handle)
        if length == 0:
            return _CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.NONE, request.handle, 0
            )
        return _CHUNK_DATA_HEADER.pack(
            STRUCTURED_REPLY_MAGIC,
            ReplyFlag.DONE,
            ReplyType.OFFSET_DATA,
            request.handle,
            8 + length,
            request.offset,
        )

    def reply_done(self, request: Request) -> bytes:
        """A successful reply to a request other than READ (which has data)."""
        if isinstance(request, ReadRequest | RejectedRequest):
            raise NBDLocalProtocolError(f"reply_done is not a reply to {request!r}")
        # Simple replies are allowed for data-less replies even with structured
        # replies negotiated, and are 4 bytes shorter than a NONE chunk.
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.handle)

    def reply_error(self, request: Request, error: Errno, message: str = "") -> bytes:
        """A failed reply; with structured replies it carries ``message``."""
        if not self.structured_replies:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, request.handle)
        text = message.encode()[:MAX_STRING_BYTES]
        payload = _ERROR_PAYLOAD.pack(error, len(text)) + text
        return (
            _CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC,
                ReplyFlag.DONE,
                ReplyType.ERROR,
                request.handle,
                len(payload),
            )
            + payload
        )
