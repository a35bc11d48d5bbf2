"""End to end: hostile peers against ``ferry serve``, ``ferry receive`` and the NBD
server as real processes (the cases of ``bench/hostile_cases/engine.py``).

For every case: the endpoint refuses it cleanly (the attacker gets no data; a
receiver ends with a one-line typed error naming the problem and no
traceback), the endpoint process stays below 200 MiB of RSS, nothing is
written outside the target directory, and a legitimate peer is served
afterwards. The ``ferry serve`` cases connect first as the local user
``nobody`` where the case says so.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from hostile_cases.base import Case
from hostile_cases.engine import ENGINE_CASES

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("setpriv") is None,
        reason="needs root and setpriv to act as another local user",
    ),
]

MAX_RSS_KIB = 200 * 1024


@pytest.mark.parametrize("case", ENGINE_CASES, ids=[c.name for c in ENGINE_CASES])
def test_hostile_peer_is_refused_and_the_endpoint_keeps_serving(
    case: Case, tmp_path: Path
) -> None:
    tmp_path.chmod(0o755)  # `nobody` may look but not write
    outcome = case.run(tmp_path)
    assert outcome.refused_cleanly, outcome.detail
    assert 0 < outcome.max_rss_kib < MAX_RSS_KIB
    assert outcome.escaped_files == 0
    assert outcome.legit_served_after, outcome.detail
