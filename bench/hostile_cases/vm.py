"""Attacks on the VM endpoints: ``ferry vm receive --listen``, ``ferry vm registry`` and
the launch exchange, each against a real process started the way users start it.

:data:`VM_CASES` is the list ``bench/hostile.py`` runs after the engine's. Every
endpoint listens on loopback with its one-time token in a 0600 file.

* Unauthenticated attacks (another local user first, wrong token, garbage, idle
  floods, a slow preamble) must get no data, and the *same* endpoint process
  must then serve the peer holding the token: a receiver answers its launch
  offer with NEED, a registry answers its request.
* Authenticated hostile offers (path traversal in a boot hash, a kernel path
  climbing out, absurd sizes and counts, wrong types, forged boot files, an
  oversized frame, a peer gone silent) must end the receiver with a one-line
  typed error, no traceback and nothing written outside its state directory;
  a fresh receiver on the same directories then serves the legitimate peer.
* Registry requests for packages it does not have (or ``../`` names) must be
  refused promptly with a typed error that reaches ``ferry vm receive
  --registry``, and the refused sockets must be closed (the registry's open
  descriptors return to where they were).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.live import launch
from ferry.testing.live import HOSTILE_OFFERS, INITRAMFS, KERNEL, frame, sample_offer
from ferry.transport.auth import (
    ACCEPTED,
    CHALLENGE_BYTES,
    MAGIC,
    NONCE_BYTES,
    client_proof,
    server_proof,
)
from hostile_cases.base import (
    FERRY,
    READY_TIMEOUT_S,
    Outcome,
    as_nobody,
    child_env,
    escaped,
    free_port,
    spawn,
    tree,
    vm_hwm_kib,
)
from hostile_cases.engine import (
    _WRONG_TOKEN,
    ServeAttack,
    _idle_flood,
    _nobody,
    _read_to_eof,
    _send_and_read,
    _slowloris,
)

SOCKET_TIMEOUT_S = 30.0
Attack = Callable[["Endpoint"], tuple[bool, str]]
"""Attacks a listening endpoint; returns (clean: the attacker got nothing, detail)."""


# -- the endpoints as processes -------------------------------------------------------------


def home(workdir: Path) -> Path:
    """The endpoint host's directories (run, state, token files): all it may write to."""
    return workdir / "host"


class Endpoint:
    """``ferry vm receive --listen`` or ``ferry vm registry`` on a loopback port."""

    def __init__(self, workdir: Path, *argv: str) -> None:
        self.port = free_port()
        home(workdir).mkdir(exist_ok=True)
        self.token_file = home(workdir) / f"token-{self.port}"
        self.env = child_env(FERRY_RUN_DIR=str(home(workdir) / "run"),
                             FERRY_STATE_DIR=str(home(workdir) / "state"))
        self.proc = spawn(
            [*FERRY, "vm", *argv, "--listen", f"127.0.0.1:{self.port}", "--token-file",
             str(self.token_file), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        assert self.proc.stdout is not None
        timer = threading.Timer(READY_TIMEOUT_S, self.proc.kill)
        timer.start()
        try:  # the --json event spans several lines; EOF if it failed or was killed
            while (line := self.proc.stdout.readline()) and b'"listening"' not in line:
                pass
        finally:
            timer.cancel()
        if not line:
            self.kill()
            raise RuntimeError(f"ferry vm {argv[0]} did not start: {self.stderr()[-300:]}")
        self.token = self.token_file.read_text().strip()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.endpoint_pid}/fd"))

    def stderr(self) -> str:
        """What it wrote on stderr (once it has ended)."""
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return " ".join(self.proc.stderr.read().decode(errors="replace").split())

    def finish(self) -> tuple[int, int, str]:
        """Wait for the process to end (it must, by itself): exit code, max RSS, stderr."""
        code, rss = self.proc.wait_rss(timeout_s=90.0)
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        return code, rss, " ".join(err.split())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _authenticated(port: int, token: str) -> socket.socket:
    """A connection that has run the token handshake (transport.auth) as the peer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
    client_nonce = os.urandom(NONCE_BYTES)
    s.sendall(MAGIC + client_nonce)
    challenge = _read_exactly(s, CHALLENGE_BYTES)
    server_nonce, proof = challenge[:NONCE_BYTES], challenge[NONCE_BYTES:]
    if proof != server_proof(token, client_nonce, server_nonce):
        s.close()
        raise RuntimeError("the endpoint does not hold the token")
    s.sendall(client_proof(token, client_nonce, server_nonce))
    if s.recv(1) != ACCEPTED:
        s.close()
        raise RuntimeError("the endpoint refused the right token")
    return s


def _read_frame(s: socket.socket) -> dict[str, Any]:
    head = _read_exactly(s, 8)
    return launch.decode_body(_read_exactly(s, launch.decode_head(head)))


def _read_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    return got


def receiver_serves_offer(port: int, token: str) -> bool:
    """The legitimate source: its offer is answered with NEED (then it goes away)."""
    try:
        with _authenticated(port, token) as s:
            s.sendall(frame(sample_offer()))
            return set(_read_frame(s).get("need", ["?"])) <= {"kernel", "initramfs"}
    except (OSError, RuntimeError, ValueError):
        return False


def registry_answers(port: int, token: str) -> bool:
    """The legitimate destination: a request is answered (here: refused, no such package)."""
    try:
        with _authenticated(port, token) as s:
            s.sendall(frame({"package": "no-such.ferry"}))
            return "no package" in str(_read_frame(s).get("refused"))
    except (OSError, RuntimeError, ValueError):
        return False


# -- unauthenticated attacks ----------------------------------------------------------------

def on_port(attack: ServeAttack) -> Attack:
    """One of the engine's attacks on a listening socket, aimed at a VM endpoint."""
    return lambda ep: attack(ep.port)




def _nobody_reads_token(ep: Endpoint) -> tuple[bool, str]:
    out = as_nobody("import sys; print(open(sys.argv[1]).read())", str(ep.token_file))
    return ep.token not in out.stdout, f"nobody: {out.stderr.strip()[-80:]}"


@dataclass(frozen=True)
class SquatCase:
    """An unauthenticated attack on a listening endpoint; then the legitimate peer."""

    name: str
    attack: Attack
    endpoint: str = "ferry vm receive"

    def run(self, workdir: Path) -> Outcome:
        if self.endpoint == "ferry vm receive":
            ep = Endpoint(workdir, "receive")
            legit: Callable[[int, str], bool] = receiver_serves_offer
        else:
            (workdir / "pkgs").mkdir()
            ep = Endpoint(workdir, "registry", str(workdir / "pkgs"))
            legit = registry_answers
        before = tree(workdir)
        try:
            clean, detail = self.attack(ep)
            alive = ep.alive
            rss = vm_hwm_kib(ep.proc.endpoint_pid) if alive else 0
            served = alive and legit(ep.port, ep.token)
        finally:
            ep.kill()
        return Outcome(self.name, self.endpoint, clean and alive,
                       detail if alive else f"{detail}; it died: {ep.stderr()[-300:]}",
                       rss, escaped(workdir, before, home(workdir)), served)


# -- authenticated hostile sources (the launch exchange) ------------------------------------


def _offer_then_close(offer: dict[str, Any]) -> Callable[[socket.socket], None]:
    def play(s: socket.socket) -> None:
        s.sendall(frame(offer))
        _read_to_eof(s)
    return play


def _forged_boot_files(s: socket.socket) -> None:
    s.sendall(frame(sample_offer()))
    need = _read_frame(s)["need"]
    for name in need:
        s.sendall((b"X" * len(KERNEL)) if name == "kernel" else INITRAMFS)
    _read_to_eof(s)


def _oversized_frame(s: socket.socket) -> None:
    s.sendall(launch.MAGIC + (2**32 - 1).to_bytes(4, "big") + b"{" * 65536)
    _read_to_eof(s)


SILENT_IDLE_TIMEOUT_S = 5.0
"""``ferry vm receive --idle-timeout`` for the silent source: the deadline is the same
code whatever its length (30 s by default)."""


def _silent(s: socket.socket) -> None:
    s.settimeout(2 * launch.IDLE_TIMEOUT_S)
    _read_to_eof(s)  # the receiver's idle deadline must end this


@dataclass(frozen=True)
class OfferCase:
    """A source holding the token plays ``play``; the receiver must end with ``expect``."""

    name: str
    play: Callable[[socket.socket], None]
    expect: str
    endpoint: str = "ferry vm receive"
    idle_timeout_s: float | None = None
    """``--idle-timeout`` of the receiver (None: its default)."""

    def run(self, workdir: Path) -> Outcome:
        extra = () if self.idle_timeout_s is None else ("--idle-timeout",
                                                        str(self.idle_timeout_s))
        ep = Endpoint(workdir, "receive", *extra)
        before = tree(workdir)
        try:
            with _authenticated(ep.port, ep.token) as s:
                self.play(s)
            code, rss, err = ep.finish()
        finally:
            ep.kill()
        cache = home(workdir) / "state" / "boot-cache"
        left = [p.name for p in cache.iterdir() if p.is_file()] if cache.is_dir() else []
        clean = (code not in (0, None) and "Traceback" not in err and self.expect in err
                 and not left)
        outside = escaped(workdir, before, home(workdir))
        again = Endpoint(workdir, "receive")
        try:
            served = receiver_serves_offer(again.port, again.token)
        finally:
            again.kill()
        return Outcome(self.name, self.endpoint, clean,
                       f"exit {code}: {err[-160:]}" + (f"; left {left}" if left else ""), rss,
                       outside, served)


# -- the registry's refusals ----------------------------------------------------------------


@dataclass(frozen=True)
class RefusalCase:
    """``ferry vm receive --registry`` asks for ``package``: a prompt typed refusal; the
    registry closes the socket (its descriptors return to where they were)."""

    name: str
    package: str
    endpoint: str = "ferry vm registry"

    def run(self, workdir: Path) -> Outcome:
        (workdir / "pkgs").mkdir()
        ep = Endpoint(workdir, "registry", str(workdir / "pkgs"))
        before = tree(workdir)
        try:
            fds = ep.open_fds()
            proc = spawn(
                [*FERRY, "vm", "receive", "--registry", f"127.0.0.1:{ep.port}", "--package",
                 self.package, "--token-file", str(ep.token_file)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=child_env(FERRY_RUN_DIR=str(workdir / "dest" / "run"),
                              FERRY_STATE_DIR=str(workdir / "dest" / "state")))
            code, _ = proc.wait_rss(timeout_s=60.0)
            err = " ".join((proc.stderr.read() if proc.stderr else b"").decode().split())
            for _ in range(50):  # the registry closes its end right after refusing
                if ep.open_fds() <= fds:
                    break
                time.sleep(0.1)
            leaked = ep.open_fds() - fds
            rss = vm_hwm_kib(ep.proc.endpoint_pid)
            served = ep.alive and registry_answers(ep.port, ep.token)
        finally:
            ep.kill()
        clean = (code == 4 and "refused" in err and "Traceback" not in err and leaked <= 0)
        return Outcome(self.name, self.endpoint, clean,
                       f"exit {code}: {err[-160:]}; {leaked} descriptor(s) leaked", rss,
                       escaped(workdir, before, workdir / "dest"), served)


VM_CASES: list[SquatCase | OfferCase | RefusalCase] = [
    SquatCase("another local user connects first (wrong token)",
              on_port(_nobody(_WRONG_TOKEN))),
    SquatCase("another local user connects first (no token, waits)", on_port(_nobody(b""))),
    SquatCase("another local user reads the token file", _nobody_reads_token),
    SquatCase("garbage instead of a token", on_port(_send_and_read(b"GET / HTTP/1.1\r\n\r\n"))),
    SquatCase("a launch offer without a token", on_port(_send_and_read(frame(sample_offer())))),
    SquatCase("50 idle connections", on_port(_idle_flood(50))),
    SquatCase("token preamble one byte per 0.5 s", on_port(_slowloris)),
    SquatCase("another local user connects first (wrong token)",
              on_port(_nobody(_WRONG_TOKEN)), endpoint="ferry vm registry"),
    SquatCase("garbage instead of a token", on_port(_send_and_read(b"\x00" * 4096)),
              endpoint="ferry vm registry"),
    SquatCase("50 idle connections", on_port(_idle_flood(50)), endpoint="ferry vm registry"),
    *(OfferCase(f"offer: {name}", _offer_then_close(make()), "malformed"
                if "sha256" not in name else "hex")
      for name, make in sorted(HOSTILE_OFFERS.items())),
    OfferCase("boot files that do not match their SHA-256", _forged_boot_files, "SHA-256"),
    OfferCase("launch frame claiming 4 GiB", _oversized_frame, "too large"),
    OfferCase("source silent after the token", _silent, "sent nothing",
              idle_timeout_s=SILENT_IDLE_TIMEOUT_S),
    RefusalCase("a package the registry does not have", "no-such.ferry"),
    RefusalCase("a package name climbing out", "../../../etc/shadow"),
]

