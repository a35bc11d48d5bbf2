"""One-time tokens and authenticated accepting: who may talk to an endpoint.

Every endpoint that carries VM data authenticates its peer before the first
protocol byte: mutual TLS (:mod:`ferry.transport.tls`), the kernel's
credentials on a UNIX socket, or, on plain TCP, a one-time *token* that the
serving side prints and the connecting side presents. See docs/security.md.

The token handshake, right after connect, proves to *each* side that the
other holds the token, without the token crossing the wire::

    client -> server   b"FERRYTK2" + client nonce                  8 + 32 bytes
    server -> client   server nonce + HMAC(token, "ferry server" + cn + sn)   32 + 32
    client -> server   HMAC(token, "ferry client" + sn + cn)           32 bytes
    server -> client   b"\x01" accepted (protocol bytes follow) | b"\x00" refused, then close

(HMAC-SHA256 keyed with the token's 32 bytes; nonces are 32 random bytes.)
The server reads exactly what the handshake needs (never a byte of the
protocol that follows), gives up at the first byte that differs from the
magic, and compares proofs with :func:`hmac.compare_digest`. The client
checks the server's proof before it answers, so a process squatting the
source's port without the token gets no proof from the client and cannot feed
it data; the client sends nothing else until it has read the final byte.

API::

    token = new_token()                                      # serving side
    await check_token(stream, token, timeout_s=10)           # server: raises AuthenticationError
    await present_token(stream, token, timeout_s=10)         # client: raises AuthenticationError
    stream = await accept_authenticated(listener, authenticate, handshake_timeout_s=10)

:func:`accept_authenticated` keeps accepting until one connection passes
``authenticate`` (a token check, a peer-credential check, or nothing more when
the listener's TLS handshake already checked the client certificate). The
others are logged and dropped; at most ``max_unauthenticated`` connections are
vetted at once (more wait in the listener's bounded backlog), each for at most
``handshake_timeout_s``, so a silent or garbage connection can neither take the
endpoint down nor hold it forever.

Tokens travel in files of mode 0600 (:func:`write_token_file`,
:func:`read_token_file`) or the ``FERRY_TOKEN`` environment variable
(:func:`token_from`), never on a command line, where ``ps`` shows it to every
local user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from ferry.errors import AuthenticationError, ConfigError, FerryError
from ferry.transport.base import Stream
from ferry.transport.listener import Listener

logger = logging.getLogger(__name__)

MAGIC = b"FERRYTK2"
TOKEN_BYTES = 32
"""Random bytes per token: 256 bits, beyond any guessing within a handshake deadline."""
TOKEN_CHARS = 2 * TOKEN_BYTES
NONCE_BYTES = 32
PROOF_BYTES = 32  # HMAC-SHA256
PREAMBLE_BYTES = len(MAGIC) + NONCE_BYTES
"""What the client sends first: the magic and its nonce."""
CHALLENGE_BYTES = NONCE_BYTES + PROOF_BYTES
"""The server's answer: its nonce and its proof."""
ACCEPTED = b"\x01"
REFUSED = b"\x00"

HANDSHAKE_TIMEOUT_S = 10.0
"""How long a connection may take to authenticate (the TLS handshake in
tcp.py uses the same figure): ample on any link, short for a squatter."""
MAX_UNAUTHENTICATED = 8
"""Connections vetted at once; further ones wait in the listener's backlog."""

TOKEN_ENV = "FERRY_TOKEN"
TOKEN_FILE_MODE = 0o600

Authenticate = Callable[[Stream], Awaitable[None]]
"""Vets one accepted stream; raises AuthenticationError (or any TransportError) to refuse."""


def new_token() -> str:
    """A fresh one-time token: 32 random bytes as 64 lowercase hex digits."""
    return secrets.token_hex(TOKEN_BYTES)


def validate_token(token: str) -> str:
    """Return ``token`` stripped of surrounding whitespace, or raise ConfigError."""
    token = token.strip()
    if len(token) != TOKEN_CHARS or any(c not in "0123456789abcdef" for c in token):
        raise ConfigError(f"a token is {TOKEN_CHARS} lowercase hex digits")
    return token


async def _receive_exactly(stream: Stream, nbytes: int, *, check_prefix: bytes = b"") -> bytes:
    """Read exactly ``nbytes`` bytes; stop early if they stop matching ``check_prefix``."""
    got = bytearray()
    while len(got) < nbytes:
        chunk = await stream.receive_some(nbytes - len(got))
        if not chunk:
            raise AuthenticationError("connection closed during authentication", peer=stream.peer)
        got += chunk
        head = bytes(got[: len(check_prefix)])
        if not check_prefix.startswith(head):
            raise AuthenticationError("peer did not present a ferry token", peer=stream.peer)
    return bytes(got)


def server_proof(token: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the server sends to show it holds ``token``."""
    return _proof(token, b"ferry server", client_nonce, server_nonce)


def client_proof(token: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the client sends to show it holds ``token``."""
    return _proof(token, b"ferry client", server_nonce, client_nonce)


def _proof(token: str, label: bytes, first: bytes, second: bytes) -> bytes:
    key = bytes.fromhex(validate_token(token))
    return hmac.digest(key, label + first + second, "sha256")


async def check_token(stream: Stream, token: str, *, timeout_s: float) -> None:
    """Server side: run the handshake within ``timeout_s``; accept or refuse.

    On refusal a REFUSED byte is sent (best effort) and AuthenticationError is
    raised; the caller closes the stream.
    """
    validate_token(token)
    try:
        async with asyncio.timeout(timeout_s):
            hello = await _receive_exactly(stream, PREAMBLE_BYTES, check_prefix=MAGIC)
            client_nonce = hello[len(MAGIC) :]
            server_nonce = secrets.token_bytes(NONCE_BYTES)
            await stream.send_all(server_nonce + server_proof(token, client_nonce, server_nonce))
            proof = await _receive_exactly(stream, PROOF_BYTES)
    except TimeoutError:
        raise AuthenticationError(
            f"no token within {timeout_s:g} s", peer=stream.peer
        ) from None
    except AuthenticationError:
        await _refuse(stream)
        raise
    if not hmac.compare_digest(proof, client_proof(token, client_nonce, server_nonce)):
        await _refuse(stream)
        raise AuthenticationError("wrong token", peer=stream.peer)
    await stream.send_all(ACCEPTED)


async def _refuse(stream: Stream) -> None:
    with contextlib.suppress(FerryError, OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await stream.send_all(REFUSED)


async def present_token(stream: Stream, token: str, *, timeout_s: float) -> None:
    """Client side: run the handshake within ``timeout_s``.

    Raises AuthenticationError if the server does not prove it holds the
    token (then the client never proves it either), refuses ours, closes, or
    does not answer in time.
    """
    validate_token(token)
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    try:
        async with asyncio.timeout(timeout_s):
            await stream.send_all(MAGIC + client_nonce)
            challenge = await _receive_exactly(stream, CHALLENGE_BYTES)
            server_nonce, proof = challenge[:NONCE_BYTES], challenge[NONCE_BYTES:]
            if not hmac.compare_digest(proof, server_proof(token, client_nonce, server_nonce)):
                raise AuthenticationError(
                    "the server's proof does not match our token (a wrong token, or not "
                    "the endpoint that printed it)",
                    peer=stream.peer,
                )
            await stream.send_all(client_proof(token, client_nonce, server_nonce))
            answer = await stream.receive_some(1)
    except TimeoutError:
        raise AuthenticationError(
            f"no answer to the token within {timeout_s:g} s", peer=stream.peer
        ) from None
    except AuthenticationError:
        raise
    except FerryError as exc:
        raise AuthenticationError(f"refused: {exc}", peer=stream.peer) from exc
    if answer == REFUSED:
        raise AuthenticationError("the server refused the token", peer=stream.peer)
    if answer != ACCEPTED:
        raise AuthenticationError(
            "the server closed the connection without accepting the token "
            "(busy with other connections, or not a ferry endpoint)",
            peer=stream.peer,
        )


def peer_uid(stream: Stream) -> int | None:
    """The user id at the other end of a UNIX socket stream (SO_PEERCRED), else None."""
    sock = getattr(stream, "socket", None)
    if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def check_same_user(stream: Stream) -> None:
    """Refuse a UNIX-socket peer that is neither our user nor root."""
    uid = peer_uid(stream)
    if uid is None:
        raise AuthenticationError(
            "peer credentials are only known on UNIX sockets", peer=stream.peer
        )
    if uid not in (os.geteuid(), 0):
        raise AuthenticationError(f"peer runs as uid {uid}, not as us", peer=stream.peer)


async def same_user(stream: Stream) -> None:
    """An :data:`Authenticate` for UNIX sockets: the kernel vouches for the peer's uid."""
    check_same_user(stream)


def token_authenticator(token: str, *, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Authenticate:
    """An :data:`Authenticate` that requires ``token``."""
    validate_token(token)

    async def authenticate(stream: Stream) -> None:
        await check_token(stream, token, timeout_s=timeout_s)

    return authenticate


async def no_authentication(stream: Stream) -> None:
    """An :data:`Authenticate` that accepts anyone: TLS already vetted the peer, or --insecure."""


async def accept_authenticated(
    listener: Listener[Any],
    authenticate: Authenticate,
    *,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    max_unauthenticated: int = MAX_UNAUTHENTICATED,
) -> Stream:
    """Accept connections until one passes ``authenticate``; return its stream.

    Connections that fail, time out or arrive while another is being accepted
    are logged and closed. Raises what ``listener.accept()`` raises (the
    listener was closed); the listener itself is left open.
    """
    if max_unauthenticated < 1:
        raise ConfigError("max_unauthenticated must be >= 1")
    winner: asyncio.Future[Stream] = asyncio.get_running_loop().create_future()
    slots = asyncio.Semaphore(max_unauthenticated)
    tasks: set[asyncio.Task[None]] = set()

    async def vet(stream: Stream) -> None:
        try:
            async with asyncio.timeout(handshake_timeout_s):
                await authenticate(stream)
        except TimeoutError:
            logger.warning(
                "%s: dropped: no authentication within %g s", stream.peer, handshake_timeout_s
            )
            await stream.aclose()
            return
        except (FerryError, OSError) as exc:
            logger.warning("dropped a connection from %s: %s", stream.peer, exc)
            await stream.aclose()
            return
        except BaseException:
            await stream.aclose()
            raise
        finally:
            slots.release()
        if winner.done():
            logger.warning("%s: dropped: another peer authenticated first", stream.peer)
            await stream.aclose()
        else:
            winner.set_result(stream)

    async def accept_loop(tg: asyncio.TaskGroup) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except BaseException:
                slots.release()
                raise
            task = tg.create_task(vet(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    try:
        async with asyncio.TaskGroup() as tg:
            acceptor = tg.create_task(accept_loop(tg))
            try:
                stream = await winner
            finally:
                acceptor.cancel()
                for task in list(tasks):
                    task.cancel()
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        raise first from None
    return stream


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` with mode 0600.

    A missing directory is created (mode 0700 for the last level): a listening
    side is often the first thing to run on a host, before anything else made
    its state directory. An existing file there is replaced only if it looks
    like an earlier token file of ours (a small regular file of mode 0600 we
    own), so a mistyped path cannot clobber anything else.
    """
    validate_token(token)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the directory of token file {path}: "
                          f"{exc.strerror}") from exc
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot write token file {path}: {exc.strerror}") from exc
    else:
        ours = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        if not ours or stat.S_IMODE(st.st_mode) != TOKEN_FILE_MODE or st.st_size > 128:
            raise ConfigError(f"{path} exists and is not a token file of ours; remove it first")
        path.unlink()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, TOKEN_FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot write token file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def read_token_file(path: Path) -> str:
    """Read a token file; refuse one that other users could read or change."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise ConfigError(f"token file {path} is readable by others (mode {mode & 0o777:o})")
        raw = f.read(TOKEN_CHARS + 64)
    try:
        return validate_token(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path} does not hold a token") from None


def token_from(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token from ``token_file`` or else ``$FERRY_TOKEN``; None if neither is given."""
    if token_file is not None:
        return read_token_file(token_file)
    value = environ.get(TOKEN_ENV)
    if value is None:
        return None
    try:
        return validate_token(value)
    except ConfigError:
        raise ConfigError(f"${TOKEN_ENV}: a token is {TOKEN_CHARS} lowercase hex digits") from None
