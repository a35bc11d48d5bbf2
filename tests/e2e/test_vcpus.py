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
        for vm in ("c2", "vol-userdata-a", "vol-userdata-b"):
            if (root / "run" / "vms" / vm).exists():
                subprocess.run([*FERRY, "vm", "stop", vm], env=env, capture_output=True,
                               timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def ferry(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*FERRY, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    if check:
        assert done.returncode == 0, f"ferry {' '.join(args)}: {done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def disk_package(minimal_package: Path) -> Iterator[Path]:
    """The minimal blueprint with 2 vCPUs and a 16 MiB data disk (one TCG boot, shared)."""
    # (minimal_package: the session's signing key exists once it was made)
    root = Path(tempfile.mkdtemp(prefix="fcpupkg-"))  # made by the first test needing it
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _disk_package(env: dict[str, str], root: Path) -> Path:
    package = root / "minimal-2cpu.ferry"
    if not package.exists():
        ferry(env, "vm", "snapshot", "minimal", "-o", str(root / "pkg"), "--cpus", "2",
              "--disk", "data:16", "--package", str(package))
    return package


def test_a_snapshot_with_two_vcpus_and_a_data_disk(env: dict[str, str], tmp_path: Path,
                                              disk_package: Path) -> None:
    # (minimal_package: the session's signing key exists once it was made)
    refused = ferry(env, "vm", "snapshot", "minimal", "-o", str(tmp_path / "bad"), "--cpus",
                    "0", check=False)
    assert refused.returncode == 2
    assert "vcpus must be 1..64" in refused.stderr
    assert not (tmp_path / "bad").exists()
    bad_disk = ferry(env, "vm", "snapshot", "minimal", "-o", str(tmp_path / "bad"), "--disk",
                     "root:16", check=False)
    assert bad_disk.returncode == 2
    assert not (tmp_path / "bad").exists()
    package = _disk_package(env, disk_package)
    ferry(env, "vm", "run", "--detach", "--name", "c2", "-e", "KEPT=across suspend",
          str(package))
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
    # The environment is guest memory (/run/ferry/env): the continued VM still has it.
    assert ferry(env, "vm", "exec", "c2", "--", "sh", "-c", "echo $KEPT").stdout \
        == "across suspend\n"



USER_SCRIPT = """#!/bin/sh
echo "userdata-script GREETING=$GREETING"
echo ran >> /root/userdata-runs
printf volume-kept > /dev/vdb && sync
"""
CLOUD_CONFIG = """#cloud-config
write_files:
  - path: /etc/app/conf
    content: |
      colour=blue
    permissions: '0600'
runcmd:
  - echo "userdata-runcmd $(cat /etc/app/conf) GREETING=$GREETING"
  - [sh, -c, "echo userdata-volume $(head -c 11 /dev/vdb)"]
"""


def test_environment_user_data_and_a_volume_that_outlives_its_vm(
        env: dict[str, str], disk_package: Path) -> None:
    """-e/--env-file reach vm exec and /run/ferry/env; a #! script and a #cloud-config run
    once after the resume, output in the console log, exit in the report. A volume the
    first VM's user data wrote in place of the package's data disk is read by a second VM
    after the first was removed; one VM holds it at a time; its VM is not migrated."""
    package = _disk_package(env, disk_package)
    root = disk_package
    (root / "ud.sh").write_text(USER_SCRIPT)
    (root / "ud.yaml").write_text(CLOUD_CONFIG)
    (root / "env").write_text("# comment\nFROM_FILE=file value\nGREETING=overridden\n")
    vms = ("vol-userdata-a", "vol-userdata-b")
    ferry(env, "volume", "create", "data-userdata", "--size", "16")
    first = json.loads(ferry(env, "vm", "run", "--detach", "--name", vms[0], "-e",
                             "GREETING=hello world", "--env-file", str(root / "env"),
                             "--user-data", str(root / "ud.sh"), "--volume", "data-userdata",
                             str(package), "--json").stdout)
    assert first["env"] == ["FROM_FILE", "GREETING"]
    assert first["volumes"] == {"data": "data-userdata"}
    ud = first["user_data"]
    assert (ud["kind"], ud["exit_code"], ud["failed_step"]) == ("script", 0, None)
    # exec gets the environment (-e wins over --env-file); the guest has the file; the
    # script ran once, with the environment, its output in the console log.
    r = ferry(env, "vm", "exec", vms[0], "--", "sh", "-c",
              'echo "$GREETING|$FROM_FILE"; cat /run/ferry/env /root/userdata-runs')
    assert r.stdout == ("hello world|file value\n"
                        "FROM_FILE=file value\nGREETING=hello world\nran\n")
    logs = ferry(env, "vm", "logs", vms[0]).stdout
    assert logs.count("userdata-script GREETING=hello world") == 1
    assert "ferry: user data exited 0" in logs
    assert json.loads(ferry(env, "vm", "inspect", vms[0]).stdout)["user_data"] == ud
    listed = json.loads(ferry(env, "volume", "ls", "--json").stdout)
    assert [(v["name"], v["in_use"]) for v in listed] == [("data-userdata", True)]
    # One VM at a time (tests/unit/vm/test_volumes.py: and no rm meanwhile); not migrated.
    second = ferry(env, "vm", "run", "--detach", "--name", vms[1], "--volume",
                   "data-userdata", str(package), check=False)
    assert second.returncode != 0
    assert "attached to another VM" in second.stderr
    moved = ferry(env, "vm", "migrate", vms[0], "--to-package", str(root / "moved.ferry"),
                  check=False)
    assert moved.returncode != 0
    assert "not migrated" in moved.stderr
    ferry(env, "vm", "stop", vms[0])  # discarded: its overlays go, the volume stays
    second_ready = json.loads(ferry(env, "vm", "run", "--detach", "--name", vms[1], "-e",
                                    "GREETING=cc", "--user-data", str(root / "ud.yaml"),
                                    "--volume", "data-userdata:data", str(package),
                                    "--json").stdout)
    ud = second_ready["user_data"]
    assert (ud["kind"], ud["exit_code"]) == ("cloud-config", 0)
    r = ferry(env, "vm", "exec", vms[1], "--", "stat", "-c", "%a", "/etc/app/conf")
    assert r.stdout == "600\n"
    logs = ferry(env, "vm", "logs", vms[1]).stdout
    assert "userdata-runcmd colour=blue GREETING=cc" in logs
    assert "userdata-volume volume-kept" in logs
    ferry(env, "vm", "stop", vms[1])
    ferry(env, "volume", "rm", "data-userdata")


def test_bad_user_data_is_refused_before_anything_starts(env: dict[str, str],
                                                         tmp_path: Path) -> None:
    bad = tmp_path / "bad-ud"
    bad.write_text("Content-Type: multipart/mixed\n")
    proc = ferry(env, "vm", "run", "--detach", "--name", "ud-userdata-bad", "--user-data",
                 str(bad), "/nonexistent.ferry", check=False)
    assert proc.returncode == 2
    assert "#cloud-config" in proc.stderr
    # A continued VM keeps its own environment: -e is refused before anything starts.
    refused = ferry(env, "vm", "run", "--name", "ud-userdata-bad", "-e", "X=1", check=False)
    assert refused.returncode == 2
    assert "continued VM" in refused.stderr
