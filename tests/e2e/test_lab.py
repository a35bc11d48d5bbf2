"""``ferry lab``: the two-host walkthrough of docs/live-migration.md from a shell, with the
``ferry`` command alone: hosts up, a VM run on one, received on the other, migrated,
serving there; the lab down leaves no host, VM or directory behind."""

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

from ferry.net import netns
from ferry.testing.packages import Signer

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]


@pytest.fixture
def env(signer: Signer) -> Iterator[dict[str, str]]:
    root = Path(tempfile.mkdtemp(prefix="flab-"))
    env = {**os.environ, **signer.env, "FERRY_RUN_DIR": str(root / "run"),
           "FERRY_STATE_DIR": str(root / "state")}
    try:
        yield env
    finally:
        subprocess.run([*FERRY, "lab", "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def ferry(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*FERRY, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"ferry {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def test_the_two_host_walkthrough_with_the_cli_alone(env: dict[str, str],
                                                     redis_package: Path,
                                                     tmp_path: Path) -> None:
    hosts = json.loads(ferry(env, "lab", "up", "wa", "wb", "--json"))
    assert [(h["name"], h["address"], h["up"]) for h in hosts] == [
        ("wa", "10.77.0.1", True), ("wb", "10.77.0.2", True)]
    token = tmp_path / "b.token"
    f = sys.executable, "-m", "ferry.cli.main"  # the same ferry, inside each host
    ferry(env, "lab", "exec", "wa", "--", *f, "vm", "run", "--detach", "--name", "r1",
          "-p", "10.77.0.1:16379:6379", str(redis_package))
    ferry(env, "lab", "exec", "wb", "--", *f, "vm", "receive", "--detach", "--listen",
          "10.77.0.2:7400", "--token-file", str(token))
    reply = json.loads(ferry(env, "lab", "exec", "wa", "--", *f, "vm", "migrate", "r1",
                             "--to", "10.77.0.2:7400", "--token-file", str(token), "--json"))
    assert reply["summary"]["handed_off"] is True
    got = ferry(env, "lab", "exec", "wb", "--", "redis-cli", "-h", "10.77.0.2", "-p", "16379",
                "get", "greeting")
    assert got.strip() == "hello"
    on_b = json.loads(ferry(env, "lab", "exec", "wb", "--", *f, "vm", "ls", "--json"))
    assert [(v["vm_id"], v["status"]) for v in on_b] == [("r1", "running")]
    assert json.loads(ferry(env, "lab", "exec", "wa", "--", *f, "vm", "ls", "--json")) == []
    # A lab host's ferry keeps its own directories, and the lab survives other ferry
    # commands' leftover cleanup (its creator exited long ago).
    assert len(json.loads(ferry(env, "lab", "ls", "--json"))) == 2
    # A command's exit code comes through.
    failed = subprocess.run([*FERRY, "lab", "exec", "wa", "--", "sh", "-c", "exit 3"],
                            env=env, timeout=60)
    assert failed.returncode == 3
    assert "stopped r1 on wb" in json.loads(ferry(env, "lab", "down", "--json"))["done"]
    assert not any(netns.exists(n) for n in ("ferry-host-wa", "ferry-host-wb",
                                            "ferry-hsw-lab"))
    assert json.loads(ferry(env, "lab", "ls", "--json")) == []
    assert not any(n.startswith("ferry-vm-r1") for n in netns.list_namespaces())
