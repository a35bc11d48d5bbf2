"""Boot real guests built from blueprints under QEMU (TCG unless KVM really works).

The first run downloads Debian's cloud kernel and packages into the ferry
cache (``$FERRY_CACHE_DIR`` or ``~/.cache/ferry``); later runs reuse them.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ferry.guest.files import MARKER_BOOTED, MARKER_READY, MARKER_STAGE1
from ferry.guest.image import build_blueprint
from ferry.guest.image.blueprint import BuiltImage, parse_blueprint
from ferry.hostconfig import HostConfig
from ferry.qemu.accel import best_accel
from ferry.qemu.argv import (
    FileDisk,
    QemuConfig,
    SerialToFile,
    UserNet,
    argv_for,
    host_tsc_khz,
    kernel_cmdline,
)
from ferry.shape import MachineShape

pytestmark = pytest.mark.e2e

# These tests call the library directly: they pass it the host configuration of the
# environment they run in (FERRY_CACHE_DIR, FERRY_ACCEL ...), as the CLI does.
HOST = HostConfig.from_environ(os.environ)

BOOT_DEADLINE_S = 120.0  # generous: TCG on a shared 2-core machine


def _argv(img: BuiltImage, log: Path, net: UserNet | None = None) -> list[str]:
    return argv_for(img.kernel, img.initramfs, QemuConfig(
        machine=MachineShape(img.blueprint.memory_mib),
        cmdline=kernel_cmdline(tsc_khz=host_tsc_khz(), net=net),
        disks=(FileDisk(img.rootfs),), serial=SerialToFile(log), net=net, accel=best_accel(HOST),
    ))


@contextmanager
def _qemu(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _wait_for(log: Path, marker: str, proc: subprocess.Popen[bytes]) -> float:
    """Seconds from now until ``marker`` shows on the console; fails if QEMU dies."""
    start = time.monotonic()
    while time.monotonic() - start < BOOT_DEADLINE_S:
        if log.exists() and marker.encode() in log.read_bytes():
            return time.monotonic() - start
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"QEMU exited {proc.returncode} before {marker!r}: {err}\n"
                        f"console:\n{log.read_text(errors='replace') if log.exists() else ''}")
        time.sleep(0.05)
    pytest.fail(f"no {marker!r} within {BOOT_DEADLINE_S} s:\n{log.read_text(errors='replace')}")


def test_minimal_blueprint_boots_to_ready(tmp_path: Path) -> None:
    img = build_blueprint("minimal", tmp_path, cache_dir=HOST.cache_root)
    log = tmp_path / "console.log"
    with _qemu(_argv(img, log)) as proc:
        _wait_for(log, MARKER_READY, proc)
    text = log.read_text()
    assert MARKER_STAGE1 in text
    assert MARKER_BOOTED in text
    assert "cannot mount" not in text  # it ran from the root disk, not the initramfs


def test_guest_writes_reach_the_root_disk(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    bp = parse_blueprint(
        f'name = "write-test"\ndisk_size_mib = 16\n[workload]\n'
        f'command = "echo {token} > /root/token && sync && poweroff -f"\n',
        base_dir=tmp_path,
    )
    img = build_blueprint(bp, tmp_path, cache_dir=HOST.cache_root)
    log = tmp_path / "console.log"
    with _qemu(_argv(img, log)) as proc:
        _wait_for(log, MARKER_BOOTED, proc)
        proc.wait(timeout=BOOT_DEADLINE_S)  # poweroff -f ends QEMU
    out = subprocess.run(["debugfs", "-R", "cat /root/token", str(img.rootfs)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == token


def test_second_build_is_a_cache_hit(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build_blueprint("minimal", tmp_path / "a", cache_dir=cache)
    second = build_blueprint("minimal", tmp_path / "b", cache_dir=cache)
    assert not first.cache_hit
    assert second.cache_hit
    assert second.key == first.key
    assert second.initramfs == first.initramfs
    assert second.rootfs != first.rootfs  # each caller gets a private disk
    log = tmp_path / "console.log"
    with _qemu(_argv(second, log)) as proc:
        _wait_for(log, MARKER_READY, proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis(port: int, *command: str) -> bytes:
    payload = f"*{len(command)}\r\n".encode() + b"".join(
        f"${len(c)}\r\n{c}\r\n".encode() for c in command)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        return s.recv(4096)


def test_redis_blueprint_serves_clients(tmp_path: Path) -> None:
    img = build_blueprint("redis", tmp_path, cache_dir=HOST.cache_root)
    port = _free_port()
    net = UserNet(host_forwards=((port, 6379),))
    log = tmp_path / "console.log"
    with _qemu(_argv(img, log, net)) as proc:
        _wait_for(log, MARKER_READY, proc)
        assert _redis(port, "PING") == b"+PONG\r\n"
        value = secrets.token_hex(8)
        assert _redis(port, "SET", "k", value) == b"+OK\r\n"
        assert _redis(port, "GET", "k") == f"${len(value)}\r\n{value}\r\n".encode()
    assert "Ready to accept connections" in log.read_text()
