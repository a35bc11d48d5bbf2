"""End to end: ``ferry serve`` and ``ferry receive`` as real processes over TCP and mutual TLS.

Plain TCP is token-guarded: every process gets the same one-time token in
``$FERRY_TOKEN`` (serve uses it instead of generating one, receive presents it).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FERRY = [sys.executable, "-m", "ferry.cli.main"]
TOKEN = secrets.token_hex(32)
ENV = {**os.environ, "FERRY_TOKEN": TOKEN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> bytes:
    """Wait for the server's readiness line (a probe connection would be taken as the peer);
    return what the server printed up to it."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if b"serving" in line and str(port).encode() in line:
            return seen
        if not line and proc.poll() is not None:
            raise AssertionError(f"server exited early: {seen!r}")
    raise AssertionError(f"server did not listen in time: {seen!r}")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    a = tmp_path / "a.img"
    a.write_bytes(os.urandom(3 * 1024 * 1024 + 777))  # size not a multiple of the block size
    b = tmp_path / "b.img"
    with open(b, "wb") as f:  # sparse, mostly zero
        f.truncate(8 * 1024 * 1024)
        f.seek(5 * 1024 * 1024)
        f.write(b"ferry" * 1000)
    return {"a": a, "b": b}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def serve(args: list[str], procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [*FERRY, "serve", "--no-progress", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    procs.append(p)
    return p


def test_serve_and_receive_over_tcp(
    tmp_path: Path, images: dict[str, Path], procs: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    server = serve(["--listen", f"127.0.0.1:{port}", f"a={images['a']}", f"b={images['b']}"], procs)
    wait_listening(port, server)
    out = tmp_path / "out"
    recv = subprocess.run(
        [
            *FERRY,
            "receive",
            "--json",
            "--no-progress",
            "--from",
            f"127.0.0.1:{port}",
            "--into",
            str(out),
        ],
        capture_output=True,
        env=ENV,
        timeout=120,
        check=False,
    )
    assert recv.returncode == 0, recv.stderr.decode()
    report = json.loads(recv.stdout)
    assert report["verified"] is True
    assert server.wait(timeout=30) == 0
    sent = json.loads(server.stdout.read() if server.stdout else b"{}")
    assert sent["outcome"] == "completed"
    assert {d["name"]: d["zero_blocks"] for d in sent["devices"]}["b"] > 100
    for name, path in images.items():
        assert (out / name).read_bytes() == path.read_bytes()
    assert not list(out.glob("*.partial"))

    # The same directory again is refused rather than overwritten.
    port2 = free_port()
    server2 = serve(["--listen", f"127.0.0.1:{port2}", f"a={images['a']}"], procs)
    wait_listening(port2, server2)
    again = subprocess.run(
        [*FERRY, "receive", "--no-progress", "--from", f"127.0.0.1:{port2}", "--into", str(out)],
        capture_output=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert again.returncode == 2, again.stderr.decode()
    assert b"refusing to overwrite" in again.stderr


def test_serve_and_receive_over_mutual_tls(
    tmp_path: Path, images: dict[str, Path], procs: list[subprocess.Popen[bytes]]
) -> None:
    pki = tmp_path / "pki"
    for argv in (
        ["certs", "ca", str(pki / "ca")],
        [
            "certs",
            "host",
            "--ca",
            str(pki / "ca"),
            "--out",
            str(pki / "src"),
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
        ["certs", "host", "--ca", str(pki / "ca"), "--out", str(pki / "dst"), "dest"],
        ["certs", "ca", str(pki / "evil-ca")],
        ["certs", "host", "--ca", str(pki / "evil-ca"), "--out", str(pki / "evil"), "evil"],
    ):
        subprocess.run([*FERRY, *argv], check=True, capture_output=True, timeout=60)

    def tls(side: str) -> list[str]:
        name = {"src": "localhost", "dst": "dest", "evil": "evil"}[side]
        return [
            "--tls-cert",
            str(pki / side / f"{name}.pem"),
            "--tls-key",
            str(pki / side / f"{name}.key"),
            "--tls-ca",
            str(pki / side / "ca.pem"),
        ]

    port = free_port()
    server = serve(["--listen", f"127.0.0.1:{port}", *tls("src"), f"a={images['a']}"], procs)
    wait_listening(port, server)
    # A client whose certificate comes from another CA is refused and receives nothing.
    evil = subprocess.run(
        [
            *FERRY,
            "receive",
            "--no-progress",
            "--from",
            f"127.0.0.1:{port}",
            "--into",
            str(tmp_path / "evil-out"),
            *tls("evil"),
        ],
        capture_output=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert evil.returncode != 0
    assert not (tmp_path / "evil-out" / "a").exists()
    # The legitimate destination still gets the device.
    out = tmp_path / "out"
    recv = subprocess.run(
        [
            *FERRY,
            "receive",
            "--no-progress",
            "--from",
            f"127.0.0.1:{port}",
            "--into",
            str(out),
            *tls("dst"),
        ],
        capture_output=True,
        env=ENV,
        timeout=120,
        check=False,
    )
    assert recv.returncode == 0, recv.stderr.decode()
    assert (out / "a").read_bytes() == images["a"].read_bytes()
    assert server.wait(timeout=30) == 0


def test_peer_disconnecting_mid_migration(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The receiver is killed mid-transfer: the source reports a peer error and its
    files are untouched; a receiver whose source dies leaves no partial files."""
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    before = big.read_bytes()
    port = free_port()
    server = serve(["--listen", f"127.0.0.1:{port}", f"big={big}"], procs)
    wait_listening(port, server)
    out = tmp_path / "out"
    recv = subprocess.Popen(
        [*FERRY, "receive", "--no-progress", "--from", f"127.0.0.1:{port}", "--into", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    procs.append(recv)
    deadline = time.monotonic() + 30
    partial = out / "big.partial"
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    recv.send_signal(signal.SIGKILL)
    recv.wait(timeout=10)
    rc = server.wait(timeout=30)
    err = server.stderr.read().decode() if server.stderr else ""
    assert rc in (1, 4), err
    assert "error" in err
    assert big.read_bytes() == before

    # Now the source dies under a live receiver.
    port = free_port()
    server = serve(["--listen", f"127.0.0.1:{port}", f"big={big}"], procs)
    wait_listening(port, server)
    out2 = tmp_path / "out2"
    recv = subprocess.Popen(
        [*FERRY, "receive", "--no-progress", "--from", f"127.0.0.1:{port}", "--into", str(out2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    procs.append(recv)
    partial = out2 / "big.partial"
    deadline = time.monotonic() + 30
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    server.send_signal(signal.SIGKILL)
    rc = recv.wait(timeout=30)
    err = recv.stderr.read().decode() if recv.stderr else ""
    assert rc == 4, err
    assert "peer" in err or "closed" in err
    assert not (out2 / "big").exists()
    assert not partial.exists()


def test_receive_over_a_command_pipe(tmp_path: Path, images: dict[str, Path]) -> None:
    """The ssh case: the receiver runs the source as a command and speaks over its stdio."""
    source_cmd = " ".join(
        [
            *FERRY,
            "serve",
            "--no-progress",
            "--listen",
            "stdio",
            f"a={images['a']}",
            f"b={images['b']}",
        ]
    )
    out = tmp_path / "out"
    recv = subprocess.run(
        [
            *FERRY,
            "receive",
            "--no-progress",
            "--json",
            "--from",
            f"exec:{source_cmd}",
            "--into",
            str(out),
        ],
        capture_output=True,
        env=ENV,
        timeout=120,
        check=False,
    )
    assert recv.returncode == 0, recv.stderr.decode()
    assert json.loads(recv.stdout)["verified"] is True
    for name, path in images.items():
        assert (out / name).read_bytes() == path.read_bytes()


def test_receive_without_the_token_is_refused_and_the_source_keeps_waiting(
    tmp_path: Path, images: dict[str, Path], procs: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    token_file = tmp_path / "token"
    server = subprocess.Popen(
        [
            *FERRY,
            "serve",
            "--no-progress",
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            str(token_file),
            f"a={images['a']}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "FERRY_TOKEN"},
    )
    procs.append(server)
    wait_listening(port, server)
    assert token_file.stat().st_mode & 0o777 == 0o600
    no_env = {k: v for k, v in os.environ.items() if k != "FERRY_TOKEN"}
    receive = [*FERRY, "receive", "--no-progress", "--from", f"127.0.0.1:{port}"]
    missing = subprocess.run(
        [*receive, "--into", str(tmp_path / "a")],
        capture_output=True, env=no_env, timeout=60, check=False,
    )
    assert missing.returncode == 2, missing.stderr.decode()
    assert b"token" in missing.stderr
    wrong = subprocess.run(
        [*receive, "--into", str(tmp_path / "b")],
        capture_output=True, env={**no_env, "FERRY_TOKEN": secrets.token_hex(32)},
        timeout=60, check=False,
    )
    assert wrong.returncode != 0
    assert b"does not match our token" in wrong.stderr
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
    right = subprocess.run(
        [*receive, "--into", str(tmp_path / "c"), "--token-file", str(token_file)],
        capture_output=True, env=no_env, timeout=120, check=False,
    )
    assert right.returncode == 0, right.stderr.decode()
    assert (tmp_path / "c" / "a").read_bytes() == images["a"].read_bytes()
    assert server.wait(timeout=30) == 0


def test_insecure_works_and_warns_on_both_sides(
    tmp_path: Path, images: dict[str, Path], procs: list[subprocess.Popen[bytes]]
) -> None:
    no_env = {k: v for k, v in os.environ.items() if k != "FERRY_TOKEN"}
    port = free_port()
    server = subprocess.Popen(
        [
            *FERRY, "serve", "--no-progress", "--insecure",
            "--listen", f"127.0.0.1:{port}", f"a={images['a']}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=no_env,
    )
    procs.append(server)
    printed = wait_listening(port, server)
    assert b"warning" in printed
    assert b"token:" not in printed
    recv = subprocess.run(
        [
            *FERRY, "receive", "--no-progress", "--insecure",
            "--from", f"127.0.0.1:{port}", "--into", str(tmp_path / "out"),
        ],
        capture_output=True, env=no_env, timeout=120, check=False,
    )
    assert recv.returncode == 0, recv.stderr.decode()
    assert b"warning" in recv.stderr
    assert (tmp_path / "out" / "a").read_bytes() == images["a"].read_bytes()
    assert server.wait(timeout=30) == 0
