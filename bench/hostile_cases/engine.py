"""Attacks on the storage engine's endpoints: ``ferry serve``, ``ferry receive``
and the NBD server, each against a real process started the way users start it.

:data:`ENGINE_CASES` is the list ``bench/hostile.py`` runs. A case is refused
cleanly when the attacker gets no data, the endpoint ends (or drops the
connection) with a typed one-line error and no traceback, and nothing is left
in the target; afterwards a legitimate peer must still be served.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lz4.frame
import zstandard

from ferry.expose.nbd.server import HANDSHAKE_TIMEOUT_S, MAX_HANDSHAKING
from ferry.protocol.codec import encode
from ferry.protocol.messages import (
    PROTOCOL_VERSION,
    DeviceInfo,
    Encoding,
    Hello,
    WriteBlocks,
)
from ferry.storage.hashing import block_hash
from ferry.transport.auth import (
    ACCEPTED,
    CHALLENGE_BYTES,
    MAGIC,
    NONCE_BYTES,
    PREAMBLE_BYTES,
    PROOF_BYTES,
    REFUSED,
    new_token,
    server_proof,
)
from hostile_cases.base import (
    Outcome,
    Serve,
    as_nobody,
    escaped,
    legit_migration,
    random_file,
    receive,
    served_intact,
    tree,
    vm_hwm_kib,
)

GiB = 1024**3
SOCKET_TIMEOUT_S = 30.0

# -- ferry serve ----------------------------------------------------------------------------

ServeAttack = Callable[[int], tuple[bool, str]]
"""Attacks a ``ferry serve`` on a loopback port; returns (got no data, detail)."""

_NOBODY_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(bytes.fromhex(sys.argv[2]))
got = b""
try:
    while chunk := s.recv(65536):
        got += chunk
except ConnectionResetError:
    pass
print(got.hex())
"""


def _only_refusal(got: bytes) -> bool:
    """Nothing but the handshake came back: at most the server's challenge (a
    nonce and a proof, no data) and the refusal byte."""
    challenge = len(got) in (CHALLENGE_BYTES, CHALLENGE_BYTES + 1)
    return got in (b"", REFUSED) or (challenge and got[CHALLENGE_BYTES:] in (b"", REFUSED))


def _nobody(payload: bytes) -> ServeAttack:
    def attack(port: int) -> tuple[bool, str]:
        out = as_nobody(_NOBODY_CLIENT, str(port), payload.hex())  # argv: no NUL bytes
        if out.returncode != 0:
            return False, f"client failed: {out.stderr.strip()[-200:]}"
        got = bytes.fromhex(out.stdout.strip())
        return _only_refusal(got), f"nobody got {len(got)} byte(s) of handshake, no data"

    return attack


def _read_to_eof(s: socket.socket) -> bytes:
    """What comes back until EOF or a reset (an endpoint that drops a peer whose bytes it
    never read closes with a reset, not a FIN)."""
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _talk(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as s:
        s.sendall(payload)
        return _read_to_eof(s)


def _send_and_read(payload: bytes) -> ServeAttack:
    def attack(port: int) -> tuple[bool, str]:
        got = _talk(port, payload)
        return _only_refusal(got), f"got {len(got)} byte(s) of handshake, no data"

    return attack


def _idle_flood(count: int) -> ServeAttack:
    def attack(port: int) -> tuple[bool, str]:
        held: list[socket.socket] = []
        refused = 0
        for _ in range(count):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                refused += 1
        readable, _, _ = select.select(held, [], [], 1.0)
        leaked = sum(1 for s in readable if s.recv(1) not in (b"", b"\x00"))
        for s in held:
            s.close()
        return leaked == 0, f"{len(held)} held, {refused} refused, {leaked} got data"

    return attack


def _slowloris(port: int) -> tuple[bool, str]:
    """The token preamble one byte every 0.5 s: the 10 s deadline must cut it off."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as s:
        start = time.monotonic()
        for b in MAGIC + new_token().encode():
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            readable, _, _ = select.select([s], [], [], 0.5)
            if readable:
                got = s.recv(1)
                return _only_refusal(got), f"cut off after {time.monotonic() - start:.1f} s"
    return False, "sent the whole preamble slowly and was never cut off"


@dataclass(frozen=True)
class ServeCase:
    name: str
    attack: ServeAttack
    endpoint: str = "ferry serve"

    def run(self, workdir: Path) -> Outcome:
        data = random_file(workdir / "src" / "disk.img", 4 << 20)
        serve = Serve(workdir, {"disk": workdir / "src" / "disk.img"})
        before = tree(workdir)
        try:
            clean, detail = self.attack(serve.port)
            alive = serve.alive
            rss = serve.hwm_kib() if alive else 0
            legit = alive and served_intact(serve, workdir, {"disk": data})
        finally:
            serve.kill()
        return Outcome(
            self.name,
            self.endpoint,
            clean and alive,
            detail if alive else f"{detail}; serve died: {serve.stderr.decode()[-300:]}",
            rss,
            escaped(workdir, before, workdir / "legit-into"),
            legit,
        )


# -- ferry receive --------------------------------------------------------------------------


class HostileSource:
    """A fake source on a loopback port that sends ``frames`` after the token
    handshake: with ``token`` it authenticates (a hostile *authenticated* source),
    without it it answers with a made-up challenge (an impostor on the port)."""

    def __init__(self, frames: list[bytes], token: str | None) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._frames = frames
        self._token = token

    def serve_one(self) -> None:
        """Run in a thread: one connection, then close."""
        conn, _ = self._server.accept()
        with conn:
            conn.settimeout(SOCKET_TIMEOUT_S)
            try:
                client_nonce = _recv_exactly(conn, PREAMBLE_BYTES)[len(MAGIC) :]
                server_nonce = os.urandom(NONCE_BYTES)
                proof = (
                    server_proof(self._token, client_nonce, server_nonce)
                    if self._token is not None
                    else bytes(PROOF_BYTES)
                )
                conn.sendall(server_nonce + proof)
                _recv_exactly(conn, PROOF_BYTES)
                conn.sendall(ACCEPTED)
                for frame in self._frames:
                    conn.sendall(frame)
                while conn.recv(65536):
                    pass  # until the receiver gives up
            except OSError:
                pass
        self._server.close()


def _hello(*devices: tuple[str, int, int]) -> bytes:
    return encode(Hello(PROTOCOL_VERSION, tuple(DeviceInfo(n, s, b) for n, s, b in devices)))


def _bomb(encoding: Encoding, packed: bytes) -> list[bytes]:
    return [
        _hello(("disk", 1 << 20, 65536)),
        encode(WriteBlocks(0, 0, encoding, (block_hash(bytes(65536)),), packed)),
    ]


@dataclass(frozen=True)
class ReceiveCase:
    name: str
    frames: Callable[[], list[bytes]]
    expect: str
    """A fragment the receiver's error message must contain."""
    config: str = ""
    knows_token: bool = True
    endpoint: str = "ferry receive"

    def run(self, workdir: Path) -> Outcome:
        target = workdir / "target"
        token = workdir / "token"
        secret = new_token()
        token.write_text(secret)
        token.chmod(0o600)
        config = workdir / "config.toml"
        config.write_text(self.config)
        source = HostileSource(self.frames(), secret if self.knows_token else None)
        thread = threading.Thread(target=source.serve_one, daemon=True)
        thread.start()
        before = tree(workdir)
        proc = receive(source.port, target, token_file=token, config=config)
        code, rss = proc.wait_rss()
        thread.join(SOCKET_TIMEOUT_S)
        err = proc.stderr.read().decode() if proc.stderr else ""
        left = sorted(p.name for p in target.rglob("*")) if target.exists() else []
        clean = (
            code not in (0, None)
            and "Traceback" not in err
            and self.expect in " ".join(err.split())
            and not left
        )
        return Outcome(
            self.name,
            self.endpoint,
            clean,
            f"exit {code}: {' '.join(err.split())[:160]}" + (f"; left {left}" if left else ""),
            rss,
            escaped(workdir, before, target),
            legit_migration(workdir, target),
        )


# -- the NBD server -------------------------------------------------------------------------

NBD_SERVER = Path(__file__).with_name("nbd_serve.py")
REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
NBD_FLAGS = 1 | 2  # FIXED_NEWSTYLE | NO_ZEROES


def _nbd_connect(path: Path) -> socket.socket:
    """Handshake into transmission on export ``disk`` (NBD_OPT_EXPORT_NAME)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(SOCKET_TIMEOUT_S)
    s.connect(str(path))
    _recv_exactly(s, 18)
    s.sendall(struct.pack(">I", NBD_FLAGS) + b"IHAVEOPT" + struct.pack(">II", 1, 4) + b"disk")
    _recv_exactly(s, 10)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    return got


def _nbd_request(command: int, handle: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, 0, command, handle, offset, length)


def _nbd_still_serves(path: Path) -> bool:
    with _nbd_connect(path) as s:
        s.sendall(_nbd_request(1, 1, 4096, 5) + b"ferry")
        if _recv_exactly(s, 16)[4:8] != bytes(4):
            return False
        s.sendall(_nbd_request(0, 2, 4096, 5))
        return _recv_exactly(s, 16)[4:8] == bytes(4) and _recv_exactly(s, 5) == b"ferry"


NBDAttack = Callable[[Path, int], tuple[bool, str]]
"""Attacks an NBD server at a socket path (its pid given); returns (clean, detail)."""


def _never_reads(path: Path, pid: int) -> tuple[bool, str]:
    reads = 60_000
    attack = b"".join(_nbd_request(0, i, (i * 4096) % (16 << 20), 4096) for i in range(reads))
    s = _nbd_connect(path)
    s.setblocking(False)
    sent, stuck_since = 0, time.monotonic()
    while sent < len(attack) and time.monotonic() - stuck_since < 2.0:
        try:
            sent += s.send(attack[sent:])
            stuck_since = time.monotonic()
        except BlockingIOError:
            select.select([], [s], [], 0.1)
    time.sleep(1.0)
    s.close()
    stopped = sent < len(attack)
    return stopped, f"server took {sent // REQUEST.size} of {reads} reads, never answered"


def _handshake_flood(path: Path, pid: int) -> tuple[bool, str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held: list[socket.socket] = []
    refused = 0
    for _ in range(1100):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(str(path))
            held.append(s)
        except OSError:
            refused += 1
            s.close()
    time.sleep(HANDSHAKE_TIMEOUT_S + 5)
    open_after = 0
    for s in held:
        try:
            while chunk := s.recv(65536):
                del chunk
        except BlockingIOError:
            open_after += 1  # no EOF: the server still holds it (or never accepted it)
        except OSError:
            pass
    for s in held:
        s.close()
    # Accepted connections are dropped after the deadline; the rest waits in
    # the listen backlog (at most its length) and is accepted MAX_HANDSHAKING
    # at a time: after one deadline, at most one batch plus the backlog is left.
    clean = open_after <= MAX_HANDSHAKING + 128
    return clean, (
        f"{len(held)} connected, {refused} refused by the kernel, {open_after} still open "
        f"after {HANDSHAKE_TIMEOUT_S + 5:g} s"
    )


def _garbage(path: Path, pid: int) -> tuple[bool, str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(SOCKET_TIMEOUT_S)
        s.connect(str(path))
        _recv_exactly(s, 18)
        s.sendall(os.urandom(4096))
        got = _read_to_eof(s)
    return True, f"dropped after {len(got)} bytes of replies"


@dataclass(frozen=True)
class NBDCase:
    name: str
    attack: NBDAttack
    endpoint: str = "NBD server"

    def run(self, workdir: Path) -> Outcome:
        sock = workdir / "nbd" / "disk.sock"
        sock.parent.mkdir(mode=0o700)
        proc = subprocess.Popen(
            [sys.executable, str(NBD_SERVER), str(sock)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            if proc.stdout.readline() != b"listening\n":
                raise RuntimeError(f"NBD server did not start: {proc.stderr!r}")
            before = tree(workdir)
            clean, detail = self.attack(sock, proc.pid)
            alive = proc.poll() is None
            rss = vm_hwm_kib(proc.pid) if alive else 0
            legit = alive and _nbd_still_serves(sock)
        finally:
            proc.kill()
            proc.wait()
        return Outcome(
            self.name, self.endpoint, clean and alive, detail, rss,
            escaped(workdir, before, sock.parent), legit,
        )


# -- the list ---------------------------------------------------------------------------------

def _zstd_bomb() -> list[bytes]:
    return _bomb(Encoding.ZSTD, zstandard.ZstdCompressor(level=1).compress(bytes(GiB)))


def _lz4_bomb() -> list[bytes]:
    return _bomb(Encoding.LZ4, lz4.frame.compress(bytes(GiB)))


_WRONG_TOKEN = MAGIC + os.urandom(NONCE_BYTES) + os.urandom(PROOF_BYTES)
"""A client hello and a made-up proof: all a client without the token can send."""

ENGINE_CASES: list[ServeCase | ReceiveCase | NBDCase] = [
    ServeCase("another local user connects first (wrong token)", _nobody(_WRONG_TOKEN)),
    ServeCase("another local user connects first (no token, waits)", _nobody(b"")),
    ServeCase("wrong token", _send_and_read(_WRONG_TOKEN)),
    ServeCase("garbage instead of a token", _send_and_read(b"GET / HTTP/1.1\r\n\r\n")),
    ServeCase("300 idle connections", _idle_flood(300)),
    ServeCase("token preamble one byte per 0.5 s", _slowloris),
    ReceiveCase(
        "a source squatting the port without the token",
        lambda: [_hello(("disk", 1 << 20, 65536))],
        "proof does not match",
        knows_token=False,
    ),
    ReceiveCase(
        "HELLO: one device of 2^31 blocks",
        lambda: [_hello(("disk", (1 << 31) * 65536, 65536))],
        "exceed",
    ),
    ReceiveCase(
        "HELLO: 1024 devices of 64 GiB",
        lambda: [_hello(*((f"d{i}", 64 * GiB, 65536) for i in range(1024)))],
        "exceed",
    ),
    ReceiveCase("HELLO: device named ../escape", lambda: [_hello(("../escape", 1 << 20, 65536))],
                "unusable device name"),
    ReceiveCase("HELLO: block size 1", lambda: [_hello(("disk", 1 << 20, 1))], "block size"),
    ReceiveCase("zstd frame stating 1 GiB for one 64 KiB block", _zstd_bomb, "zstd frame"),
    ReceiveCase("lz4 frame stating 1 GiB for one 64 KiB block", _lz4_bomb, "lz4 frame"),
    ReceiveCase("garbage frames", lambda: [os.urandom(4096)], "error"),
    ReceiveCase(
        "source silent after the token",
        list,
        "sent nothing",
        config="[migration]\nidle_timeout_s = 2.0\n",
    ),
    NBDCase("client never reads replies (60000 x 4 KiB reads, memory device)", _never_reads),
    NBDCase("1100 idle handshakes", _handshake_flood),
    NBDCase("garbage after the greeting", _garbage),
]
