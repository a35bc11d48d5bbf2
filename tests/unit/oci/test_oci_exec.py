"""``oci-exec`` (src/ferry/oci/files/oci-exec.c) on the host, in a chroot of its own: the
user, groups, HOME, working directory, environment and exit codes a container process gets.
Needs root (chroot) and busybox-static (scripts/setup.sh installs it), as the VMs do."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ferry.oci.guest import exec_binary

BUSYBOX = shutil.which("busybox")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root"),
    pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is not installed"),
]

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1001:\nextra:x:2000:other,app\nother:x:2001:bob\n"


@pytest.fixture(scope="module")
def oci_exec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exec_binary(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "bin").mkdir(parents=True)
    (r / "etc").mkdir()
    assert BUSYBOX is not None
    shutil.copy(BUSYBOX, r / "bin" / "busybox")
    (r / "etc" / "passwd").write_text(PASSWD)
    (r / "etc" / "group").write_text(GROUP)
    return r


def run(oci_exec: Path, root: Path, user: str, workdir: str, env: list[str],
        *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(oci_exec), str(root), user, workdir, str(len(env)), *env, *argv],
                          capture_output=True, text=True, timeout=30, check=False)


def test_named_user_gets_its_ids_groups_home_and_workdir(oci_exec: Path, root: Path) -> None:
    p = run(oci_exec, root, "app", "/srv/work", ["PATH=/bin", "X=1"], "/bin/busybox", "sh",
            "-c", "/bin/busybox id -u; /bin/busybox id -g; /bin/busybox id -G; "
                  "/bin/busybox pwd; echo $HOME $X")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:5] == ["1000", "1001", "1001 2000", "/srv/work",
                                        "/home/app 1"]
    assert (root / "srv" / "work").is_dir()  # created, as Docker does


def test_environment_is_exactly_the_images(oci_exec: Path, root: Path) -> None:
    p = run(oci_exec, root, "", "/", ["PATH=/bin", "A=b c"], "/bin/busybox", "env")
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == ["A=b c", "HOME=/root", "PATH=/bin"]
    given = run(oci_exec, root, "", "/", ["HOME=/x"], "/bin/busybox", "env")
    assert given.stdout.splitlines() == ["HOME=/x"]


@pytest.mark.parametrize(("user", "ids"), [
    ("65534:65534", "65534 65534 65534"),  # unknown numeric ids are taken as they are
    ("1000", "1000 1001 1001"),  # a known uid gets its passwd group, no supplementary ones
    ("app:other", "1000 2001 2001 2000"),
    ("app:42", "1000 42 42 2000"),
])
def test_user_forms(oci_exec: Path, root: Path, user: str, ids: str) -> None:
    p = run(oci_exec, root, user, "/", ["PATH=/bin"], "/bin/busybox", "sh", "-c",
            "echo $(/bin/busybox id -u) $(/bin/busybox id -g) $(/bin/busybox id -G)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ids


@pytest.mark.parametrize(("user", "message"), [("ghost", "no user ghost"),
                                               ("app:ghosts", "no group ghosts")])
def test_unknown_user_or_group(oci_exec: Path, root: Path, user: str, message: str) -> None:
    p = run(oci_exec, root, user, "/", [], "/bin/busybox", "true")
    assert p.returncode == 126
    assert message in p.stderr


def test_missing_program_is_127(oci_exec: Path, root: Path) -> None:
    p = run(oci_exec, root, "", "/", ["PATH=/bin"], "nothere")
    assert p.returncode == 127
    assert "exec nothere" in p.stderr


def test_bad_usage(oci_exec: Path, root: Path) -> None:
    p = subprocess.run([str(oci_exec), str(root), "", "/", "5", "A=1"], capture_output=True,
                       text=True, check=False)
    assert p.returncode == 126
    assert "usage" in p.stderr
