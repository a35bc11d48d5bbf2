"""safe_join: a peer-supplied name never leaves its directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import RemoteProtocolError
from ferry.vm.safepath import UnsafePathError, safe_join


def test_relative_names_stay_inside(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "boot/vmlinuz") == tmp_path.resolve() / "boot" / "vmlinuz"


@pytest.mark.parametrize("name", ["", "..", "../x", "a/../../x", "/etc/shadow", "a//b", "./a",
                                  "a/.", "a\0b", "x" * 2000])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, name)


def test_a_planted_symlink_cannot_lead_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        safe_join(root, "link/secret")


def test_unsafe_path_is_a_remote_protocol_error(tmp_path: Path) -> None:
    with pytest.raises(RemoteProtocolError):
        safe_join(tmp_path, "../x")
