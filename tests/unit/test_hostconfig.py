"""HostConfig.from_environ: the variables, their defaults, and the JSON a holder gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.hostconfig import Accel, HostConfig, parse_accel


def test_defaults_from_an_environment_with_only_home() -> None:
    host = HostConfig.from_environ({"HOME": "/home/u"})
    assert host == HostConfig(
        run_root=Path("/run/ferry"), state_root=Path("/var/lib/ferry"),
        cache_root=Path("/home/u/.cache/ferry"),
        package_cache=Path("/home/u/.cache/ferry/packages"),
        trust_dir=Path("/home/u/.config/ferry/trusted-keys"),
        signing_key=Path("/home/u/.config/ferry/keys/signing.key"),
        accel=None, qemu_sandbox=True)
    assert host.net_run_dir == Path("/run/ferry/net")


def test_every_variable_overrides_its_field() -> None:
    host = HostConfig.from_environ({
        "HOME": "/home/u", "FERRY_RUN_DIR": "/r", "FERRY_STATE_DIR": "/s",
        "FERRY_CACHE_DIR": "/c", "FERRY_PACKAGE_CACHE_DIR": "/p", "FERRY_TRUST_DIR": "/t",
        "FERRY_SIGNING_KEY": "/k/signing.key", "FERRY_ACCEL": "TCG",
        "FERRY_QEMU_SANDBOX": "off"})
    assert host == HostConfig(Path("/r"), Path("/s"), Path("/c"), Path("/p"), Path("/t"),
                              Path("/k/signing.key"), Accel.TCG, qemu_sandbox=False)
    assert host.net_run_dir == Path("/r/net")


def test_derived_defaults_follow_their_base() -> None:
    host = HostConfig.from_environ({"HOME": "/home/u", "FERRY_CACHE_DIR": "/c",
                                    "XDG_CONFIG_HOME": "/cfg"})
    assert host.package_cache == Path("/c/packages")
    assert host.trust_dir == Path("/cfg/ferry/trusted-keys")
    assert host.signing_key == Path("/cfg/ferry/keys/signing.key")


def test_empty_variables_count_as_unset() -> None:
    empty = {name: "" for name in ("FERRY_RUN_DIR", "FERRY_STATE_DIR", "FERRY_CACHE_DIR",
                                   "FERRY_PACKAGE_CACHE_DIR", "FERRY_TRUST_DIR",
                                   "FERRY_SIGNING_KEY", "FERRY_ACCEL", "FERRY_QEMU_SANDBOX",
                                   "XDG_CONFIG_HOME")}
    assert (HostConfig.from_environ({"HOME": "/h", **empty})
            == HostConfig.from_environ({"HOME": "/h"}))


@pytest.mark.parametrize(("value", "on"), [("off", False), ("OFF", False), ("0", False),
                                           ("no", False), ("on", True), ("1", True)])
def test_sandbox_switch(value: str, on: bool) -> None:
    assert HostConfig.from_environ({"HOME": "/h", "FERRY_QEMU_SANDBOX": value}).qemu_sandbox is on


@pytest.mark.parametrize(("text", "want"), [("", None), ("auto", None), (" KVM ", Accel.KVM),
                                            ("tcg", Accel.TCG)])
def test_parse_accel(text: str, want: Accel | None) -> None:
    assert parse_accel(text) is want


def test_a_bad_accelerator_is_refused_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match="FERRY_ACCEL='hvf'"):
        HostConfig.from_environ({"HOME": "/h", "FERRY_ACCEL": "hvf"})


def test_json_round_trip() -> None:
    host = HostConfig.from_environ({"HOME": "/h", "FERRY_ACCEL": "kvm",
                                    "FERRY_QEMU_SANDBOX": "no"})
    assert HostConfig.from_json(host.to_json()) == host
    with pytest.raises(TypeError):
        HostConfig.from_json(host.to_json() | {"qemu_sandbox": "no"})


def test_fields_are_checked_on_construction() -> None:
    with pytest.raises(ConfigError):
        HostConfig("/r", Path("/s"), Path("/c"), Path("/p"), Path("/t"),  # type: ignore[arg-type]
                   Path("/k"))
