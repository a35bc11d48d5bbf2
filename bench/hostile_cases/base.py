"""What every hostile case shares: the case shape, its outcome, and the machinery
to start real endpoint processes the way users start them and to measure them.

A case is any object with ``name``, ``endpoint`` and ``run(workdir) ->
Outcome`` (:class:`Case`); ``workdir`` is a fresh directory the case owns.
Memory is the endpoint process's high-water RSS: ``VmHWM`` from
``/proc/PID/status`` while it runs, or ``ru_maxrss`` from ``wait4`` for a
process that has exited (the same figure, read at exit).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

FERRY = [sys.executable, "-m", "ferry.cli.main"]
READY_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 120.0


@dataclass(slots=True)
class Outcome:
    case: str
    endpoint: str
    refused_cleanly: bool
    detail: str
    max_rss_kib: int
    escaped_files: int
    legit_served_after: bool


class Case(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def endpoint(self) -> str: ...

    def run(self, workdir: Path) -> Outcome: ...


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child, without any token we might have inherited."""
    env = {k: v for k, v in os.environ.items() if k != "FERRY_TOKEN"}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_kib(pid: int) -> int:
    """The high-water RSS of a running process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def wait_rss(proc: subprocess.Popen[bytes], timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, int]:
    """Wait for ``proc``; return (exit code, max RSS in KiB). Kills it after ``timeout_s``."""
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss)


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def escaped(root: Path, before: set[Path], allowed: Path) -> int:
    """Files that appeared under ``root`` (the case's workdir, which holds the
    target) outside ``allowed`` since ``before``."""
    return sum(
        1
        for p in tree(root) - before
        if not p.is_dir() and allowed not in p.parents and p != allowed
    )


def random_file(path: Path, size_bytes: int) -> bytes:
    """A file only its owner may read, as the issue's root-only image."""
    data = os.urandom(size_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return data


class Serve:
    """A ``ferry serve`` process on a loopback port, its token in a 0600 file."""

    def __init__(self, workdir: Path, devices: dict[str, Path], *extra: str) -> None:
        self.port = free_port()
        self.token_file = workdir / "serve.token"
        self.proc = subprocess.Popen(
            [
                *FERRY, "serve", "--no-progress", "--listen", f"127.0.0.1:{self.port}",
                "--token-file", str(self.token_file), *extra,
                *(f"{name}={path}" for name, path in devices.items()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        self.stderr = b""
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.stderr += line
            if line.startswith(b"serving"):
                threading.Thread(target=self._drain, daemon=True).start()
                return
            if not line and self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"ferry serve did not start: {self.stderr.decode()}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def hwm_kib(self) -> int:
        return vm_hwm_kib(self.proc.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def receive(
    port: int, into: Path, *, token_file: Path | None = None, config: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``ferry receive`` from a loopback source."""
    argv = [*FERRY, "receive", "--no-progress", "--from", f"127.0.0.1:{port}", "--into", str(into)]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    if config is not None:
        argv += ["-c", str(config)]
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env()
    )


def legit_migration(workdir: Path, into: Path) -> bool:
    """A real source and a real receiver: does a device still arrive intact in ``into``?"""
    name = f"legit-{secrets.token_hex(4)}"
    data = random_file(workdir / "legit-src" / "disk.img", 1 << 20)
    serve = Serve(workdir, {name: workdir / "legit-src" / "disk.img"})
    try:
        proc = receive(serve.port, into, token_file=serve.token_file)
        code, _ = wait_rss(proc)
        return code == 0 and (into / name).read_bytes() == data
    finally:
        serve.kill()


def served_intact(serve: Serve, workdir: Path, expected: dict[str, bytes]) -> bool:
    """After an attack on ``serve``: does the legitimate receiver get every device?"""
    into = workdir / "legit-into"
    code, _ = wait_rss(receive(serve.port, into, token_file=serve.token_file))
    return code == 0 and all((into / n).read_bytes() == d for n, d in expected.items())


def as_nobody(code: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as the unprivileged local user ``nobody``."""
    return subprocess.run(
        [
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            sys.executable, "-I", "-c", code, *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd="/",
    )
