"""Ctrl-C and SIGTERM at several points of real commands: each ends within 5 s,
exits 130 or 143, and leaves no QEMU, FUSE mount, network namespace or output behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ferry.net import netns
from ferry.testing.packages import Signer

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]
END_WITHIN_S = 5.0  # the bound from the signal to the exit
READY_TIMEOUT_S = 240.0  # TCG on a shared 2-core machine


@dataclass
class Running:
    """A ferry command whose stderr is collected line by line as it runs."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    seen: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, text: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        with self.seen:
            ok = self.seen.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                timeout_s)
        if not ok or not any(text in line for line in self.lines):
            pytest.fail(f"no {text!r} from the command; it said:\n{''.join(self.lines)}")

    def signal_and_wait(self, signum: int) -> tuple[int, float]:
        sent = time.monotonic()
        self.proc.send_signal(signum)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"still running 60 s after {signal.Signals(signum).name}")
        return rc, time.monotonic() - sent


def start(env: dict[str, str], *args: str) -> Running:
    proc = subprocess.Popen([*FERRY, *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    running = Running(proc)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with running.seen:
                running.lines.append(line)
                running.seen.notify_all()
        with running.seen:
            running.seen.notify_all()

    threading.Thread(target=pump, daemon=True).start()
    return running


@dataclass(frozen=True)
class Host:
    root: Path
    env: dict[str, str]

    def qemus(self) -> list[int]:
        """QEMU processes this test's commands started: their command line or their
        environment (inherited from the ferry command, which runs with this host's
        directories in it) names this test's root. Other QEMUs on the machine (a
        snapshot elsewhere) are not ours."""
        found = []
        root = str(self.root).encode()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmd = (proc / "cmdline").read_bytes()
                if b"qemu-system" not in cmd.split(b"\0")[0]:
                    continue
                env = (proc / "environ").read_bytes()
            except OSError:
                continue
            if root in cmd or root in env:
                found.append(int(proc.name))
        return found

    def mounts(self) -> list[str]:
        return [line for line in Path("/proc/mounts").read_text().splitlines()
                if " fuse" in line and (str(self.root) in line or "ferry-snap-" in line)]


@pytest.fixture(scope="module")
def host(signer: Signer) -> Iterator[Host]:
    root = Path(tempfile.mkdtemp(prefix="fsig-"))
    env = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(root / "run"),
           "FERRY_STATE_DIR": str(root / "state"),
           "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    try:
        yield Host(root, env)
    finally:
        subprocess.run([*FERRY, "doctor", "--clean", "--json"], env=env,
                       capture_output=True, check=False, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def assert_clean(host: Host, namespaces_before: set[str]) -> None:
    deadline = time.monotonic() + 5
    while host.qemus() and time.monotonic() < deadline:
        time.sleep(0.1)  # QEMU dies with its parent (PDEATHSIG): allow the kernel a moment
    assert host.qemus() == []
    assert host.mounts() == []
    assert set(netns.list_namespaces()) - namespaces_before == set()


@pytest.mark.parametrize(("when", "signum", "code"), [
    ("booting", signal.SIGINT, 130),
    ("agent up", signal.SIGTERM, 143),
])
def test_snapshot(host: Host, minimal_package: Path, when: str, signum: int,
                  code: int) -> None:
    before = set(netns.list_namespaces())
    out = host.root / f"snap-{code}"
    cmd = start(host.env, "vm", "snapshot", "minimal", "-o", str(out))
    cmd.wait_for(when)
    rc, took = cmd.signal_and_wait(signum)
    assert rc == code, "".join(cmd.lines)
    assert took < END_WITHIN_S
    assert not out.exists()
    assert_clean(host, before)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_in_the_foreground(host: Host, minimal_package: Path, signum: int,
                               code: int) -> None:
    before = set(netns.list_namespaces())
    name = f"sig-{code}"
    cmd = start(host.env, "vm", "run", "--name", name, str(minimal_package))
    cmd.wait_for("running")
    rc, took = cmd.signal_and_wait(signum)
    assert rc == code, "".join(cmd.lines)
    assert took < END_WITHIN_S
    assert not (host.root / "run" / "vms" / name).exists()
    assert_clean(host, before)


def test_run_while_verifying(host: Host, minimal_package: Path) -> None:
    before = set(netns.list_namespaces())
    cmd = start(host.env, "vm", "run", "--name", "sig-early", str(minimal_package))
    cmd.wait_for("verifying")
    rc, took = cmd.signal_and_wait(signal.SIGINT)
    assert rc == 130, "".join(cmd.lines)
    assert took < END_WITHIN_S
    assert_clean(host, before)


@pytest.fixture(scope="module")
def demo_package(host: Host) -> None:
    """One full ``ferry demo vm``: builds (or reuses) the demo's signed Redis package."""
    out = subprocess.run([*FERRY, "demo", "vm", "--no-progress"], env=host.env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("when", "signum", "code"), [
    ("verifying", signal.SIGTERM, 143),
    ("resuming the package", signal.SIGINT, 130),
])
def test_demo(host: Host, demo_package: None, when: str, signum: int, code: int) -> None:
    before = set(netns.list_namespaces())
    cmd = start(host.env, "demo", "vm")
    cmd.wait_for(when)
    rc, took = cmd.signal_and_wait(signum)
    assert rc == code, "".join(cmd.lines)
    assert took < END_WITHIN_S
    assert_clean(host, before)
    assert list((host.root / "run" / "vms").glob("*/supervisor.json")) == []
