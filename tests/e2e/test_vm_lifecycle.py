"""The VM lifecycle end to end: blueprint -> snapshot -> signed package -> resumed VMs.

Real QEMU (TCG here), real FUSE and NBD, real network namespaces, the real
``ferry`` CLI and detached supervisor processes. The session's minimal and Redis
packages (tests/e2e/conftest.py) are shared by the tests (a TCG boot takes
seconds; a resume takes a fraction of one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.net import netns
from ferry.testing.packages import Signer
from ferry.testing.site import holder_pids
from ferry.vm.manifest import VMManifest
from ferry.vm.registry import VMPaths

from .conftest import MINIMAL_MARK

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]
CLI_TIMEOUT_S = 180.0


@dataclass(frozen=True, slots=True)
class Env:
    root: Path
    paths: VMPaths
    env: dict[str, str]

    def ferry(self, *args: str, check: bool = True,
              timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*FERRY, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"ferry {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def ferry_json(self, *args: str) -> object:
        return json.loads(self.ferry(*args, "--json").stdout)


@pytest.fixture(scope="module")
def env(signer: Signer) -> Iterator[Env]:
    # Short paths: UNIX socket names are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="fvm-"))
    paths = VMPaths(root / "run", root / "state")
    environ = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(paths.run_root),
               "FERRY_STATE_DIR": str(paths.state_root),
               "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    e = Env(root, paths, environ)
    try:
        yield e
    finally:
        for pid in holder_pids(paths):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        # Whatever is still there (a killed supervisor's network, a dead mount) goes now.
        subprocess.run([sys.executable, "-c",
                        "import asyncio,sys; from pathlib import Path; "
                        "from ferry.vm.registry import VMPaths, cleanup_leftovers; "
                        "asyncio.run(cleanup_leftovers(VMPaths(Path(sys.argv[1]), "
                        "Path(sys.argv[2]))))", str(paths.run_root), str(paths.state_root)],
                       check=False, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class MinimalPackage:
    file: Path
    directory: Path


@pytest.fixture(scope="module")
def minimal(signer: Signer, minimal_package: Path) -> MinimalPackage:
    return MinimalPackage(minimal_package, signer.snapshot_dir("minimal"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis(port: int, *command: str) -> bytes:
    """One RESP command to 127.0.0.1:port; returns the reply (a bulk string's content)."""
    payload = f"*{len(command)}\r\n".encode()
    for part in command:
        payload += f"${len(part.encode())}\r\n{part}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        data = b""
        while True:
            chunk = s.recv(4096)
            data += chunk
            first, _, rest = data.partition(b"\r\n")
            if not chunk or (_ and not first.startswith(b"$")) or first == b"$-1":
                return first
            if first.startswith(b"$") and rest.endswith(b"\r\n"):
                return rest[:-2]


def _run_detached(env: Env, *args: str) -> dict[str, object]:
    report = env.ferry_json("vm", "run", "--detach", *args)
    assert isinstance(report, dict)
    return report


# -- minimal: exec, package, verify, tamper, resume --------------------------------------


def test_the_snapshot_is_a_complete_package(minimal: MinimalPackage) -> None:
    manifest = VMManifest.load(minimal.directory)
    assert manifest.machine.memory_mib == 128
    assert manifest.network.ip == "10.0.2.15"
    # Block hashes: one 16-byte XXH3-128 per 64 KiB block of each device.
    hashes = (minimal.directory / manifest.memory.hashes_path).stat().st_size
    assert hashes == manifest.memory.size_bytes // manifest.memory.block_size_bytes * 16
    assert (minimal.directory / manifest.state).read_bytes()[:4] == b"QEVM"


def test_package_verifies_and_tampering_is_refused(env: Env, minimal: MinimalPackage) -> None:
    info = env.ferry_json("package", "verify", str(minimal.file))
    assert isinstance(info, dict)
    assert info["files"] >= 7
    data = bytearray(minimal.file.read_bytes())
    tampered = env.root / "tampered.ferry"
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    proc = env.ferry("package", "verify", str(tampered), check=False)
    assert proc.returncode == 3, proc.stderr
    truncated = env.root / "truncated.ferry"
    truncated.write_bytes(minimal.file.read_bytes()[: len(data) - 100])
    proc = env.ferry("package", "verify", str(truncated), check=False)
    assert proc.returncode == 3, proc.stderr
    assert "truncated" in proc.stderr.lower() or "ends" in proc.stderr.lower()
    # Running a tampered package is refused before anything starts.
    proc = env.ferry("vm", "run", "--detach", "--name", "evil", str(tampered), check=False)
    assert proc.returncode == 3, proc.stderr
    assert not env.paths.run_dir("evil").exists()
    assert not netns.exists("ferry-vm-evil")


def test_resume_minimal_and_exec_again(env: Env, minimal: MinimalPackage) -> None:
    report = _run_detached(env, "--name", "mini", str(minimal.file))
    resume = report["resume"]
    assert isinstance(resume, dict)
    assert resume["running_s"] > 0
    try:
        # The file written before the snapshot is there: this is the snapshot's guest.
        r = env.ferry("vm", "exec", "mini", "--", "cat", "/root/mark")
        assert r.stdout == f"{MINIMAL_MARK}\n"
        r = env.ferry("vm", "exec", "mini", "--", "sh", "-c", "echo err >&2; exit 5",
                      check=False)
        assert (r.returncode, r.stderr) == (5, "err\n")
        # It resumed rather than booted: the console of the new QEMU shows no boot.
        console = Path(str(report["console"])).read_text(errors="replace")
        assert "ferry-guest: stage1" not in console
        listed = env.ferry_json("vm", "list")
        assert isinstance(listed, list)
        assert [v["status"] for v in listed if v["vm_id"] == "mini"] == ["running"]
    finally:
        env.ferry("vm", "stop", "mini")
    assert not env.paths.run_dir("mini").exists()
    assert not env.paths.state_dir("mini").exists()  # discarded
    assert not netns.exists("ferry-vm-mini")
    # The package's files were never written.
    assert env.ferry_json("package", "verify", str(minimal.file))


# -- interactive: exec -i / -it on a pty, the serial console attached ---------------------

PTY_DEADLINE_S = 60.0


class PtyProcess:
    """A ``ferry`` command on a real pseudo-terminal, driven like a user at a keyboard."""

    def __init__(self, env: Env, *args: str, rows: int, cols: int) -> None:
        self.master, slave = pty.openpty()
        self.set_size(rows, cols)
        self.attrs = termios.tcgetattr(slave)
        self._slave = slave
        self.proc = subprocess.Popen([*FERRY, *args], env=env.env, stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True)
        self.seen = b""

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes) -> re.Match[bytes]:
        """Read until ``pattern`` matches what came since the last match."""
        deadline = time.monotonic() + PTY_DEADLINE_S
        while not (m := re.search(pattern, self.seen)):
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and not self._readable(0)):
                pytest.fail(f"no {pattern!r} on the terminal; it shows: {self.seen[-2000:]!r}")
            if self._readable(min(left, 1.0)):
                with contextlib.suppress(OSError):  # EIO: nobody has the terminal open
                    self.seen += os.read(self.master, 65536)
        self.seen = self.seen[m.end():]
        return m

    def _readable(self, timeout_s: float) -> bool:
        return bool(select.select([self.master], [], [], timeout_s)[0])

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=PTY_DEADLINE_S)
        finally:
            self.slave_attrs = termios.tcgetattr(self._slave)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self._slave)


def test_exec_on_a_tty_with_stdin_and_the_console_attached(env: Env,
                                                         minimal: MinimalPackage) -> None:
    vm = "mtty"
    _run_detached(env, "--name", vm, str(minimal.file))
    term: PtyProcess | None = None
    try:
        # exec -it: a shell on a pty in the guest, sized like ours, following our size.
        term = PtyProcess(env, "vm", "exec", "-it", vm, "--", "sh", rows=33, cols=101)
        term.type(b"tty; stty size\r")
        term.expect(rb"/dev/pts/\d+\r\n")
        term.expect(rb"\b33 101\r\n")
        term.set_size(40, 120)
        os.kill(term.proc.pid, signal.SIGWINCH)  # what the kernel sends the foreground job
        term.type(b"stty size\r")
        term.expect(rb"\b40 120\r\n")
        term.type(b"read line; echo got-$line\r")
        term.type(b"typed-here\r")
        term.expect(rb"got-typed-here\r\n")
        term.type(b"exit 7\r")
        assert term.wait() == 7
        # Our terminal is back as it was (not raw).
        assert term.slave_attrs == term.attrs
        term.close()
        # -i without -t: stdin streamed through pipes (no pty), exit code and stderr apart.
        r = subprocess.run([*FERRY, "vm", "exec", "-i", vm, "--", "sh", "-c",
                            "tty; tr a-z A-Z; echo done >&2; exit 3"],
                           input=b"hello\nworld\n", env=env.env, capture_output=True,
                           timeout=CLI_TIMEOUT_S, check=False)
        assert (r.returncode, r.stdout, r.stderr) == (3, b"not a tty\nHELLO\nWORLD\n",
                                                      b"done\n"), r.stderr
        # More than the agent's window (256 KiB) each way: acknowledgements keep it going.
        blob = os.urandom(300_000)
        r = subprocess.run([*FERRY, "vm", "exec", "-i", vm, "--", "cat"], input=blob,
                           env=env.env, capture_output=True, timeout=CLI_TIMEOUT_S, check=False)
        assert (r.returncode, len(r.stdout), r.stdout == blob) == (0, len(blob), True), r.stderr
        # attach: the serial console's shell answers; a second attacher is refused;
        # Ctrl-] detaches and leaves the guest running.
        term = PtyProcess(env, "vm", "attach", vm, rows=24, cols=80)
        term.expect(rb"detach with Ctrl-\]")
        term.type(b"\recho tty-attach-$((6*7))\r")
        term.expect(rb"tty-attach-42")
        second = env.ferry("vm", "attach", vm, check=False)
        assert second.returncode == 1
        assert "attached to the console already" in second.stderr
        term.type(b"\x1d")
        assert term.wait() == 0
        term.expect(rb"detached from the console")
        assert term.slave_attrs == term.attrs
        term.close()
        # The console can be attached again (QEMU listens again; the holder is free).
        term = PtyProcess(env, "vm", "attach", vm, rows=24, cols=80)
        term.expect(rb"detach with Ctrl-\]")
        term.type(b"\recho again-$((1+1))\r")
        term.expect(rb"again-2")
        term.type(b"\x1d")
        assert term.wait() == 0
        # QEMU kept the console log all along, the attached part included.
        console = env.paths.run_dir(vm).glob("console.*.log")
        assert any(b"tty-attach-42" in p.read_bytes() for p in console)
        # The guest goes on without anyone attached.
        assert env.ferry("vm", "exec", vm, "--", "echo", "up").stdout == "up\n"
    finally:
        if term is not None:
            term.close()
        env.ferry("vm", "stop", vm, check=False)


# -- redis: two VMs from one package, suspend/continue, crash cleanup -------------------


def test_two_vms_from_one_package(env: Env, redis_package: Path) -> None:
    ports = {"ra": _free_port(), "rb": _free_port()}
    started = []
    try:
        for vm_id, port in ports.items():
            report = _run_detached(env, "--name", vm_id, "-p", f"127.0.0.1:{port}:6379",
                                   str(redis_package))
            started.append(vm_id)
            assert report["forwards"] == [f"127.0.0.1:{port}->6379/tcp"]
        for port in ports.values():
            assert _redis(port, "PING") == b"+PONG"
            assert _redis(port, "GET", "greeting") == b"hello"
            assert _redis(port, "INCR", "counter") == b":42"
        # Independent VMs: a write to one is not seen by the other.
        assert _redis(ports["ra"], "SET", "only-a", "1") == b"+OK"
        assert _redis(ports["rb"], "EXISTS", "only-a") == b":0"
        r = env.ferry("vm", "exec", "rb", "--", "redis-cli", "get", "counter")
        assert r.stdout == "42\n"
    finally:
        for vm_id in started:
            env.ferry("vm", "stop", vm_id)
            # The stop answered once the VM was gone: nothing of it is left.
            assert not env.paths.run_dir(vm_id).exists()
            assert not netns.exists(f"ferry-vm-{vm_id}")
            assert list(env.paths.net_run_dir.glob(f"*{vm_id}*.json")) == []
    listed = env.ferry_json("vm", "list")
    assert isinstance(listed, list)
    assert [v for v in listed if v["vm_id"] in ports] == []


def test_stop_with_suspend_and_continue(env: Env, redis_package: Path) -> None:
    port = _free_port()
    _run_detached(env, "--name", "rc", "-p", f"127.0.0.1:{port}:6379", str(redis_package))
    try:
        assert _redis(port, "SET", "added-after-resume", "yes") == b"+OK"
        stopped = env.ferry_json("vm", "stop", "rc", "--suspend")
        assert isinstance(stopped, dict)
        assert stopped["mode"] == "suspend"
        assert not netns.exists("ferry-vm-rc")
        listed = env.ferry_json("vm", "list")
        assert isinstance(listed, list)
        assert [v["status"] for v in listed if v["vm_id"] == "rc"] == ["suspended"]
        # No package this time: the VM continues from its own overlays and state, and
        # without -p it keeps the forwards it was suspended with.
        continued = _run_detached(env, "--name", "rc")
        assert continued["forwards"] == [f"127.0.0.1:{port}->6379/tcp"]
        assert _redis(port, "GET", "added-after-resume") == b"yes"
        assert _redis(port, "GET", "greeting") == b"hello"
    finally:
        env.ferry("vm", "stop", "rc", check=False)
    assert not env.paths.state_dir("rc").exists()


def test_leftovers_of_a_killed_supervisor_are_cleaned(env: Env, redis_package: Path) -> None:
    report = _run_detached(env, "--name", "rk", str(redis_package))
    pid, qemu_pid = report["pid"], report["qemu_pid"]
    assert isinstance(pid, int)
    assert isinstance(qemu_pid, int)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(pid) or _alive(qemu_pid):  # QEMU dies with its supervisor (PDEATHSIG)
        assert time.monotonic() < deadline, "QEMU outlived its supervisor"
        time.sleep(0.1)
    # What the killed run left: its namespace, run dir (dead FUSE mount) and overlays.
    assert netns.exists("ferry-vm-rk")
    assert env.paths.run_dir("rk").exists()
    assert env.paths.state_dir("rk").exists()
    listed = env.ferry_json("vm", "list")
    assert isinstance(listed, list)
    assert "rk" not in [v["vm_id"] for v in listed]
    # The next start cleans all of it up.
    _run_detached(env, "--name", "rn", str(redis_package))
    try:
        assert not netns.exists("ferry-vm-rk")
        assert not env.paths.run_dir("rk").exists()
        assert not env.paths.state_dir("rk").exists()
        with open("/proc/self/mountinfo") as f:
            assert str(env.paths.run_dir("rk")) not in f.read()
    finally:
        env.ferry("vm", "stop", "rn")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def test_rm_removes_a_suspended_vm_and_refuses_a_running_one(env: Env,
                                                            redis_package: Path) -> None:
    _run_detached(env, "--name", "rr", str(redis_package))
    try:
        refused = env.ferry("vm", "rm", "rr", check=False)
        assert refused.returncode == 1
        assert "is running" in refused.stderr
        env.ferry("vm", "stop", "rr", "--suspend")
        assert env.paths.state_dir("rr").exists()
        assert env.ferry_json("vm", "rm", "rr") == {"vm_id": "rr", "removed": "removed"}
        assert not env.paths.state_dir("rr").exists()
        assert [v for v in _listed(env) if v["vm_id"] == "rr"] == []
        missing = env.ferry("vm", "rm", "rr", check=False)
        assert missing.returncode == 1
        assert "no such VM" in missing.stderr
        # -f stops a running one.
        _run_detached(env, "--name", "rr", str(redis_package))
        assert env.ferry_json("vm", "rm", "rr", "-f") == {"vm_id": "rr", "removed": "stopped"}
        assert [v for v in _listed(env) if v["vm_id"] == "rr"] == []
    finally:
        env.ferry("vm", "stop", "rr", check=False)
        env.ferry("vm", "rm", "rr", check=False)


def _listed(env: Env) -> list[dict[str, object]]:
    listed = env.ferry_json("vm", "list")
    assert isinstance(listed, list)
    return listed
