from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.guest.image.blueprint import _input_key, load_blueprint, parse_blueprint
from ferry.guest.image.elf import read_elf
from ferry.guest.image.errors import BlueprintError

GOOD = """
name = "web-1"
memory_mib = 192
disk_size_mib = 32
packages = ["redis-tools"]
modules = ["vsock"]

[[files]]
src = "app.conf"
dest = "/etc/app.conf"
mode = 0o600

[workload]
command = "echo 'it''s' \\"$HOME\\""
readiness = "true"
"""


def test_parse_good(tmp_path: Path) -> None:
    (tmp_path / "app.conf").write_text("x")
    bp = parse_blueprint(GOOD, base_dir=tmp_path)
    assert bp.name == "web-1"
    assert (bp.memory_mib, bp.disk_size_mib) == (192, 32)
    assert bp.packages == ("redis-tools",)
    assert bp.modules == ("vsock",)
    assert bp.files[0].src == tmp_path / "app.conf"
    assert (bp.files[0].dest, bp.files[0].mode) == ("/etc/app.conf", 0o600)
    assert bp.readiness == "true"


def test_env_file_round_trips_through_sh(tmp_path: Path) -> None:
    (tmp_path / "app.conf").write_text("x")
    bp = parse_blueprint(GOOD, base_dir=tmp_path)
    env = tmp_path / "blueprint.env"
    env.write_bytes(bp.env_file())
    out = subprocess.run(["sh", "-c", f'. {env}; printf %s "$FERRY_WORKLOAD"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == bp.workload


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("memory_mib = 64", "name"),
        ('name = "x"\nbogus = 1', "unknown keys"),
        ('name = "Bad Name"', "name"),
        ('name = "x"\nmemory_mib = "64"', "memory_mib must be int"),
        ('name = "x"\nmemory_mib = true', "memory_mib must be int"),
        ('name = "x"\nmemory_mib = 4', "memory_mib"),
        ('name = "x"\ndisk_size_mib = 1', "disk_size_mib"),
        ('name = "x"\npackages = ["Not_A_Package"]', "Debian package name"),
        ('name = "x"\npackages = [1]', "list of strings"),
        ('name = "x"\n[[files]]\nsrc = "missing"\ndest = "/a"', "does not exist"),
        ('name = "x"\n[[files]]\nsrc = "."\ndest = "rel"', "absolute"),
        ('name = "x"\n[[files]]\nsrc = "."\ndest = "/a/../b"', "absolute"),
        ('name = "x"\n[[files]]\ndest = "/a"', "src and dest"),
        ('name = "x"\n[workload]\ncmd = "x"', "workload"),
        ("name = ", "invalid TOML"),
    ],
)
def test_validation_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(BlueprintError, match=match) as info:
        parse_blueprint(text, base_dir=tmp_path, path="bp.toml")
    assert isinstance(info.value, ConfigError)
    assert info.value.path == "bp.toml"


def test_shipped_blueprints_load() -> None:
    minimal = load_blueprint("minimal")
    assert minimal.packages == ()
    assert minimal.name == "minimal"
    redis = load_blueprint("redis")
    assert "redis-server" in redis.packages
    assert redis.workload is not None
    assert "--protected-mode no" in redis.workload
    with pytest.raises(BlueprintError, match="shipped"):
        load_blueprint("no-such-blueprint")


def test_with_memory_overrides_memory_only_and_keeps_the_image() -> None:
    redis = load_blueprint("redis")
    big = redis.with_memory(512)
    assert big.memory_mib == 512
    assert big.with_memory(redis.memory_mib) == redis  # nothing else changed
    # Memory is the machine's, not the image's: both share one cache entry.
    assert _input_key(big, "k", {}) == _input_key(redis, "k", {})
    assert _input_key(replace(redis, disk_size_mib=65), "k", {}) != _input_key(redis, "k", {})


@pytest.mark.parametrize("mib", [0, 15, 65537, -1])
def test_with_memory_is_validated_as_the_file_value(mib: int) -> None:
    with pytest.raises(BlueprintError, match=r"memory_mib must be 16\.\.65536"):
        load_blueprint("redis").with_memory(mib)


@pytest.mark.parametrize("mib", [16, 65536])
def test_memory_takes_the_machine_shapes_bounds(mib: int) -> None:
    assert load_blueprint("redis").with_memory(mib).memory_mib == mib


def test_load_from_path(tmp_path: Path) -> None:
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\n')
    assert load_blueprint(p).name == "mine"


def test_read_elf_of_a_host_binary() -> None:
    info = read_elf(Path("/usr/bin/qemu-img"))
    assert "libc.so.6" in info.needed
    assert info.interpreter == "/lib64/ld-linux-x86-64.so.2"
