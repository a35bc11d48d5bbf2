"""What every e2e module shares: ONE minimal and ONE Redis package per session.

Both are made as users make them (``ferry key create --trust``, then ``ferry
vm snapshot BLUEPRINT --package FILE``), signed by one key that
:attr:`Signer.env` makes trusted; a module gives its hosts that environment.
A snapshot is a TCG boot (tens of seconds on this machine): made once, not
once per module. Tests never write to these files (a resume works on
overlays in its own state dir), so sharing them is safe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.qemu.accel import CACHE_FILE, DEFAULT_RUN_DIR
from ferry.testing.packages import Signer
from ferry.testing.site import LIVE_SITES

MINIMAL_MARK = "snapshotted"
"""Written to /root/mark in the minimal guest before its snapshot."""
REDIS_KEYS = {"greeting": "hello", "counter": "41"}
"""Set in the Redis guest before its snapshot."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    """A failed test's report shows where every VM holder of its site waits, and the end
    of each one's log (a hang on a CI machine is otherwise a bare pytest timeout)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "call" and report.failed:
        report.sections.append(("machine", _machine()))
        for site in list(LIVE_SITES):
            if text := site.holder_logs():
                report.sections.append(("VM holders", text))


def _machine() -> str:
    """What a failure on another machine needs said: its cores, load and accelerator."""
    try:
        accel = json.loads((DEFAULT_RUN_DIR / CACHE_FILE).read_text())
        chosen = f"{accel.get('accel')} ({accel.get('reason')})"
    except (OSError, ValueError, AttributeError):
        chosen = "not probed"
    return (f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, accelerator {chosen}")


@pytest.fixture(scope="session")
def signer() -> Iterator[Signer]:
    root = Path(tempfile.mkdtemp(prefix="fe2e-"))  # short: UNIX socket paths
    try:
        yield Signer(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def minimal_package(signer: Signer) -> Path:
    """The minimal blueprint, snapshotted after writing /root/mark, signed."""
    return signer.package("minimal", prepare=[f"echo {MINIMAL_MARK} > /root/mark && sync"])


@pytest.fixture(scope="session")
def redis_package(signer: Signer) -> Path:
    """The Redis blueprint (256 MiB), snapshotted with :data:`REDIS_KEYS` set, signed."""
    return signer.package("redis", prepare=[f"redis-cli set {k} {v}"
                                            for k, v in REDIS_KEYS.items()])
