"""End to end: hostile peers against ``ferry vm receive --listen``, ``ferry vm registry``
and the launch exchange as real processes (the cases of ``bench/hostile_cases/vm.py``),
and the CLI refusing to run unauthenticated without saying so.

For every case: the attacker gets no data (or the receiver ends with a one-line typed
error naming the problem and no traceback), the endpoint process stays below 200 MiB of
RSS, nothing is written outside its state directory, and the legitimate peer is served
afterwards. Needs no QEMU: the legitimate peer is served up to the launch exchange.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from hostile_cases.base import FERRY, Case, child_env
from hostile_cases.vm import VM_CASES

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("setpriv") is None,
        reason="needs root and setpriv to act as another local user",
    ),
]

MAX_RSS_KIB = 200 * 1024


@pytest.mark.parametrize("case", VM_CASES, ids=[f"{c.endpoint}: {c.name}" for c in VM_CASES])
def test_hostile_peer_is_refused_and_the_endpoint_keeps_serving(
    case: Case, tmp_path: Path
) -> None:
    tmp_path.chmod(0o755)  # `nobody` may look but not write
    outcome = case.run(tmp_path)
    assert outcome.refused_cleanly, outcome.detail
    assert 0 < outcome.max_rss_kib < MAX_RSS_KIB
    assert outcome.escaped_files == 0
    assert outcome.legit_served_after, outcome.detail


def ferry(tmp_path: Path, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = child_env(FERRY_RUN_DIR=str(tmp_path / "run"), FERRY_STATE_DIR=str(tmp_path / "state"))
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=False)


def test_registry_of_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    out = ferry(tmp_path, "vm", "registry", str(tmp_path / "nonexistent"), "--listen",
                "127.0.0.1:0")
    assert out.returncode == 2, out.stderr
    assert "not a directory" in out.stderr


def test_migrate_without_a_token_or_tls_is_a_usage_error(tmp_path: Path) -> None:
    out = ferry(tmp_path, "vm", "migrate", "r1", "--to", "127.0.0.1:9")
    assert out.returncode == 2, out.stderr
    assert "token" in out.stderr
    assert "--insecure" in out.stderr


def test_insecure_warns_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "pkgs").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(FERRY_RUN_DIR=str(tmp_path / "run"), FERRY_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen([*FERRY, "vm", "registry", str(tmp_path / "pkgs"), "--listen",
                             f"127.0.0.1:{port}", "--insecure"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline().decode()
    finally:
        proc.kill()
        proc.wait()
    assert "warning" in first
    assert "--insecure" in first


def test_the_token_file_is_the_owners_only(tmp_path: Path) -> None:
    (tmp_path / "pkgs").mkdir()
    token = tmp_path / "registry.token"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(FERRY_RUN_DIR=str(tmp_path / "run"), FERRY_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen([*FERRY, "vm", "registry", str(tmp_path / "pkgs"), "--listen",
                             f"127.0.0.1:{port}", "--token-file", str(token)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stderr is not None
        assert b"registry of" in proc.stderr.readline()
        assert token.stat().st_mode & 0o777 == 0o600
    finally:
        proc.kill()
        proc.wait()
