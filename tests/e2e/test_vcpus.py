"""``ferry vm snapshot --cpus N --disk NAME:MIB``: the guest boots with N virtual CPUs and a
data disk; the package records both, a resume of it has N (the guest counts them; QEMU was
given ``-smp N``) and the disk, and what the guest wrote to the disk survives a suspend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.testing.packages import Signer

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]


@pytest.fixture
def env(signer: Signer) -> Iterator[dict[str, str]]:
    root = Path(tempfile.mkdtemp(prefix="fcpu-"))
    env = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(root / "run"),
           "FERRY_STATE_DIR": str(root / "state"), "FERRY_PACKAGE_CACHE_DIR": str(root / "pc")}
    try:
        yield env
    finally:
        subprocess.run([*FERRY, "vm", "stop", "c2"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def ferry(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*FERRY, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    if check:
        assert done.returncode == 0, f"ferry {' '.join(args)}: {done.stderr[-2000:]}"
    return done


def test_a_snapshot_with_two_vcpus_and_a_data_disk(env: dict[str, str], tmp_path: Path,
                                              minimal_package: Path) -> None:
    # (minimal_package: the session's signing key exists once it was made)
    refused = ferry(env, "vm", "snapshot", "minimal", "-o", str(tmp_path / "bad"), "--cpus",
                    "0", check=False)
    assert refused.returncode == 2
    assert "vcpus must be 1..64" in refused.stderr
    assert not (tmp_path / "bad").exists()
    package = tmp_path / "minimal-2cpu.ferry"
    bad_disk = ferry(env, "vm", "snapshot", "minimal", "-o", str(tmp_path / "bad"), "--disk",
                     "root:16", check=False)
    assert bad_disk.returncode == 2
    assert not (tmp_path / "bad").exists()
    ferry(env, "vm", "snapshot", "minimal", "-o", str(tmp_path / "pkg"), "--cpus", "2",
          "--disk", "data:16", "--package", str(package))
    ferry(env, "vm", "run", "--detach", "--name", "c2", str(package))
    assert ferry(env, "vm", "exec", "c2", "--", "nproc").stdout.strip() == "2"
    qemu_pid = json.loads(ferry(env, "vm", "inspect", "c2").stdout)["qemu_pid"]
    argv = Path(f"/proc/{qemu_pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-smp") + 1] == b"2"
    # The data disk: 16 MiB (32768 sectors); written, suspended, continued, read back.
    assert ferry(env, "vm", "exec", "c2", "--", "cat",
                 "/sys/block/vdb/size").stdout.strip() == "32768"
    ferry(env, "vm", "exec", "c2", "--", "sh", "-c",
          "printf ferry-data > /dev/vdb && sync")
    ferry(env, "vm", "stop", "c2", "--suspend")
    ferry(env, "vm", "run", "--detach", "--name", "c2")
    got = ferry(env, "vm", "exec", "c2", "--", "head", "-c", "10", "/dev/vdb").stdout
    assert got == "ferry-data"
