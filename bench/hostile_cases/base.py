"""What every hostile case shares: the case shape, its outcome, and the machinery
to start real endpoint processes the way users start them and to measure them.

A case is any object with ``name``, ``endpoint`` and ``run(workdir) ->
Outcome`` (:class:`Case`); ``workdir`` is a fresh directory the case owns.
Memory is the endpoint process's high-water RSS: ``VmHWM`` from
``/proc/PID/status`` while it runs, or ``ru_maxrss`` from ``wait4`` once it
has exited. Endpoints start through :func:`spawn`, a small reaper process that
forks them: ``ru_maxrss`` of a process forked straight from a big parent (a
long pytest run) counts the parent's memory at the fork, because Linux carries
the pre-exec address space's high-water mark into it. Through the reaper the
floor is the reaper's own few MiB.
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
from typing import Any, Protocol

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


# The reaper: forks the endpoint (through setpriv, so it dies with the reaper),
# passes SIGINT/SIGTERM/SIGHUP on, reports "PID\n" then "MAXRSS_KIB\n" on the fd
# named in argv[1], and ends the way the endpoint ended.
_REAPER = """
import os, signal, sys
fd, argv = int(sys.argv[1]), sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execvp("setpriv", ["setpriv", "--pdeathsig", "KILL", "--", *argv])
def forward(n, _frame):
    try:
        os.kill(pid, n)
    except ProcessLookupError:
        pass
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, forward)
os.write(fd, b"%d\\n" % pid)
_, status, usage = os.wait4(pid, 0)
os.write(fd, b"%d\\n" % usage.ru_maxrss)
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


class Spawned(subprocess.Popen[bytes]):
    """An endpoint started through the reaper. ``pid`` is the reaper's (signals,
    ``kill`` and pipes work as for any ``Popen``); ``endpoint_pid`` is the
    endpoint's own, for ``/proc``."""

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        r, w = os.pipe()
        try:
            super().__init__(
                [sys.executable, "-I", "-S", "-c", _REAPER, str(w), *argv],
                pass_fds=(w,), **kwargs,
            )
        finally:
            os.close(w)
        self._report = os.fdopen(r, "rb")
        self.endpoint_pid = int(self._report.readline())

    def wait_rss(self, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, int]:
        """Wait for the endpoint; return (exit code, its max RSS in KiB). Kills it
        after ``timeout_s``."""
        timer = threading.Timer(timeout_s, self.kill)
        timer.start()
        try:
            code = self.wait()
        finally:
            timer.cancel()
        line = self._report.readline()
        self._report.close()
        if not line:
            raise RuntimeError(f"the reaper of {self.args!r} ended without a report (exit {code})")
        return code, int(line)


def spawn(argv: list[str], **kwargs: Any) -> Spawned:
    """Start an endpoint the way users do, measured on its own (see the module doc)."""
    return Spawned(argv, **kwargs)


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
        self.proc = spawn(
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
        return vm_hwm_kib(self.proc.endpoint_pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def receive(
    port: int, into: Path, *, token_file: Path | None = None, config: Path | None = None
) -> Spawned:
    """Start ``ferry receive`` from a loopback source."""
    argv = [*FERRY, "receive", "--no-progress", "--from", f"127.0.0.1:{port}", "--into", str(into)]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    if config is not None:
        argv += ["-c", str(config)]
    return spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())


def legit_migration(workdir: Path, into: Path) -> bool:
    """A real source and a real receiver: does a device still arrive intact in ``into``?"""
    name = f"legit-{secrets.token_hex(4)}"
    data = random_file(workdir / "legit-src" / "disk.img", 1 << 20)
    serve = Serve(workdir, {name: workdir / "legit-src" / "disk.img"})
    try:
        proc = receive(serve.port, into, token_file=serve.token_file)
        code, _ = proc.wait_rss()
        return code == 0 and (into / name).read_bytes() == data
    finally:
        serve.kill()


def served_intact(serve: Serve, workdir: Path, expected: dict[str, bytes]) -> bool:
    """After an attack on ``serve``: does the legitimate receiver get every device?"""
    into = workdir / "legit-into"
    code, _ = receive(serve.port, into, token_file=serve.token_file).wait_rss()
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
