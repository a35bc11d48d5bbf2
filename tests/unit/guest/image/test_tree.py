from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ferry.guest.image.errors import ImageError
from ferry.guest.image.rootfs import resolve_in_root
from ferry.guest.image.tree import Tree, write_newc


def _sample(tmp_path: Path) -> Tree:
    host = tmp_path / "host.bin"
    host.write_bytes(bytes(range(256)) * 5 + b"x")  # odd length exercises padding
    tree = Tree()
    tree.write("/etc/ferry/modules", b"a.ko\nb.ko\n")
    tree.copy("/bin/tool", host, mode=0o755)
    tree.symlink("/bin/sh", "/bin/tool")
    tree.mkdir("/tmp", 0o1777)
    return tree


def test_newc_archive_unpacks_with_real_cpio(tmp_path: Path) -> None:
    tree = _sample(tmp_path)
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as f:
        write_newc(tree, f)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(archive)], cwd=out, check=True)
    assert (out / "etc/ferry/modules").read_bytes() == b"a.ko\nb.ko\n"
    assert (out / "bin/tool").read_bytes() == (tmp_path / "host.bin").read_bytes()
    assert (out / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert os.readlink(out / "bin/sh") == "/bin/tool"
    assert (out / "tmp").stat().st_mode & 0o7777 == 0o1777


def test_archive_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        with p.open("wb") as f:
            write_newc(_sample(tmp_path), f)
    assert a.read_bytes() == b.read_bytes()


def test_materialize_and_conflicts(tmp_path: Path) -> None:
    tree = _sample(tmp_path)
    tree.materialize(tmp_path / "root")
    assert (tmp_path / "root/etc/ferry/modules").read_bytes() == b"a.ko\nb.ko\n"
    assert os.readlink(tmp_path / "root/bin/sh") == "/bin/tool"
    with pytest.raises(ImageError):
        tree.write("/bin/tool/inside", b"")  # a file cannot be a parent directory
    with pytest.raises(ImageError):
        tree.write("/../escape", b"")


def test_resolve_in_root_keeps_absolute_links_inside(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "lib64").mkdir()
    real = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    real.write_bytes(b"loader")
    os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", root / "lib64/ld-linux-x86-64.so.2")
    os.symlink("libz.so.1.2", root / "lib/x86_64-linux-gnu/libz.so.1")
    (root / "lib/x86_64-linux-gnu/libz.so.1.2").write_bytes(b"z")
    assert resolve_in_root(root, "/lib64/ld-linux-x86-64.so.2") == real
    assert resolve_in_root(root, "/lib/x86_64-linux-gnu/libz.so.1") == (
        root / "lib/x86_64-linux-gnu/libz.so.1.2")
    assert resolve_in_root(root, "/lib/missing.so") is None
    os.symlink("loop", root / "loop")
    assert resolve_in_root(root, "/loop") is None
