"""A suspended VM's forwards: kept in its record, read back, and a bad record costs only them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.net import PortForward, Proto
from ferry.vm.registry import VM_RECORD, VMPaths, write_json
from ferry.vm.runner import saved_forwards

FORWARDS = (PortForward("127.0.0.1", 6379, 6379),
            PortForward("::1", 0, 53, Proto.UDP),
            PortForward("0.0.0.0", 8080, 80, allow_wildcard=True))


def record(tmp_path: Path, **fields: object) -> VMPaths:
    paths = VMPaths(tmp_path / "run", tmp_path / "state")
    paths.state_dir("r1").mkdir(parents=True)
    write_json(paths.state_dir("r1") / VM_RECORD, {"vm_id": "r1", **fields})
    return paths


def test_a_suspended_vm_gives_back_its_forwards(tmp_path: Path) -> None:
    paths = record(tmp_path, status="suspended", forwards=[f.to_json() for f in FORWARDS])
    assert saved_forwards(paths, "r1") == FORWARDS


def test_only_a_suspended_vm_has_saved_forwards(tmp_path: Path) -> None:
    paths = record(tmp_path, status="running", forwards=[f.to_json() for f in FORWARDS])
    assert saved_forwards(paths, "r1") == ()
    assert saved_forwards(VMPaths(tmp_path / "x", tmp_path / "y"), "r1") == ()


@pytest.mark.parametrize("bad", [
    [["127.0.0.1", 1]],                          # too short
    [["not-an-ip", 1, 2, "tcp", False]],         # NetConfigError
    [["0.0.0.0", 1, 2, "tcp", False]],           # a wildcard not allowed
    [["127.0.0.1", "x", 2, "tcp", False]],
    [["127.0.0.1", 1, 2, "sctp", False]],
    "not a list",
])
def test_unreadable_forwards_are_dropped_not_fatal(tmp_path: Path, bad: object) -> None:
    paths = record(tmp_path, status="suspended", forwards=bad)
    assert saved_forwards(paths, "r1") == ()
