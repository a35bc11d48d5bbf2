"""The sandbox probe runs once per host boot; a cache entry can never turn the sandbox off.

"QEMU" here is a script that records each start and answers as a QEMU with or
without seccomp would (exit 0, or exit 1 with QEMU's message).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ferry.qemu import probecache
from ferry.qemu.sandbox import CACHE_FILE, SANDBOX_OPTION, sandbox_option

probe = sandbox_option.__wrapped__  # without the per-process memo


def fake_qemu(tmp_path: Path, *, seccomp: bool) -> tuple[Path, Path]:
    starts = tmp_path / "starts"
    script = tmp_path / "qemu"
    script.write_text("#!/bin/sh\n"
                      f"echo started >> {starts}\n"
                      + ("exit 0\n" if seccomp else
                         "echo 'qemu: -sandbox on: seccomp support is disabled' >&2\nexit 1\n"))
    script.chmod(0o755)
    return script, starts


def starts(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_supported_sandbox_is_probed_once_per_boot(tmp_path: Path) -> None:
    qemu, log = fake_qemu(tmp_path, seccomp=True)
    assert probe(str(qemu), tmp_path) == SANDBOX_OPTION
    assert probe(str(qemu), tmp_path) == SANDBOX_OPTION
    assert starts(log) == 1
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    assert data["supported"] is True
    assert data["key"] == probecache.host_key(str(qemu), option=SANDBOX_OPTION)


def test_another_qemu_binary_is_probed_again(tmp_path: Path) -> None:
    qemu, log = fake_qemu(tmp_path, seccomp=True)
    assert probe(str(qemu), tmp_path) == SANDBOX_OPTION
    st = qemu.stat()
    os.utime(qemu, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # an upgrade
    assert probe(str(qemu), tmp_path) == SANDBOX_OPTION
    assert starts(log) == 2


def test_an_unsupported_sandbox_is_not_cached(tmp_path: Path) -> None:
    qemu, log = fake_qemu(tmp_path, seccomp=False)
    assert probe(str(qemu), tmp_path) is None
    assert probe(str(qemu), tmp_path) is None
    assert starts(log) == 2
    assert not (tmp_path / CACHE_FILE).exists()


def test_a_cache_entry_cannot_turn_the_sandbox_off(tmp_path: Path) -> None:
    qemu, log = fake_qemu(tmp_path, seccomp=True)
    key = probecache.host_key(str(qemu), option=SANDBOX_OPTION)
    probecache.write(tmp_path / CACHE_FILE, key, {"supported": False})  # planted
    assert probe(str(qemu), tmp_path) == SANDBOX_OPTION
    assert starts(log) == 1


def test_a_corrupt_cache_is_a_miss(tmp_path: Path) -> None:
    qemu, log = fake_qemu(tmp_path, seccomp=True)
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert probe(str(qemu), tmp_path) == SANDBOX_OPTION
    assert starts(log) == 1
