"""docker run's override rules, the readiness check and the run script, without a VM."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.oci.guest import (
    EXEC_PATH,
    Process,
    RunOverrides,
    guest_name,
    process_for,
    readiness_for,
    run_script,
)
from ferry.oci.manifest import ExposedPort, ImageConfig


def config(entrypoint: tuple[str, ...] = ("/bin/app",), cmd: tuple[str, ...] = ("--serve",),
           env: tuple[str, ...] = ("PATH=/bin", "A=1"),
           ports: tuple[ExposedPort, ...] = ()) -> ImageConfig:
    return ImageConfig(architecture="amd64", os="linux", entrypoint=entrypoint, cmd=cmd,
                       env=env, workdir="/srv", user="app", exposed_ports=ports,
                       stop_signal="", diff_ids=())


@pytest.mark.parametrize(("overrides", "argv"), [
    (RunOverrides(), ("/bin/app", "--serve")),
    (RunOverrides(args=("--check",)), ("/bin/app", "--check")),
    (RunOverrides(entrypoint="/bin/sh"), ("/bin/sh",)),  # --entrypoint clears the cmd
    (RunOverrides(entrypoint="/bin/sh", args=("-c", "x")), ("/bin/sh", "-c", "x")),
])
def test_argv_follows_docker_run(overrides: RunOverrides, argv: tuple[str, ...]) -> None:
    assert process_for(config(), overrides).argv == argv


def test_cmd_only_image() -> None:
    assert process_for(config(entrypoint=()), RunOverrides()).argv == ("--serve",)
    with pytest.raises(ConfigError, match="no entrypoint or cmd"):
        process_for(config(entrypoint=(), cmd=()), RunOverrides())


def test_env_overrides_and_defaults() -> None:
    p = process_for(config(), RunOverrides(env=("A=2", "B=x=y")))
    assert p.env == ("PATH=/bin", "A=2", "B=x=y")
    assert (p.workdir, p.user) == ("/srv", "app")
    no_path = process_for(config(env=()), RunOverrides())
    assert no_path.env[0].startswith("PATH=/usr/local/sbin:")


@pytest.mark.parametrize("bad", ["NOVALUE", "1X=2", "=v", "A B=1"])
def test_bad_env(bad: str) -> None:
    with pytest.raises(ConfigError):
        RunOverrides(env=(bad,))


def test_readiness() -> None:
    assert readiness_for(config(), RunOverrides()) is None
    assert readiness_for(config(), RunOverrides(readiness="true")) == "true"
    udp_then_tcp = (ExposedPort(53, "udp"), ExposedPort(8080, "tcp"))
    check = readiness_for(config(ports=udp_then_tcp), RunOverrides())
    assert check is not None
    assert ":1F90 " in check  # 8080 in /proc/net/tcp's hex


def test_readiness_matches_only_a_listening_socket(tmp_path: Path) -> None:
    check = readiness_for(config(ports=(ExposedPort(8080, "tcp"),)), RunOverrides())
    assert check is not None
    header = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    listening = "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000\n"
    connected = "   1: 0100007F:1F90 0100007F:D2A0 01 00000000:00000000\n"
    for body, ok in ((listening, True), (connected, False), ("", False)):
        (tmp_path / "tcp").write_text(header + body)
        (tmp_path / "tcp6").write_text(header)
        cmd = check.replace("/proc/net/", f"{tmp_path}/")
        assert (subprocess.run(["sh", "-c", cmd], check=False).returncode == 0) is ok


def test_run_script_quotes_everything() -> None:
    script = run_script(Process(argv=("/bin/echo", "it's", "$HOME", "a b"),
                                env=("X=$(reboot)",), workdir="/w d", user="1:2")).decode()
    last = script.strip().splitlines()[-1]
    words = shlex.split(last)
    assert words[:7] == ["exec", EXEC_PATH, "$R", "1:2", "/w d", "1", "X=$(reboot)"]
    assert words[7:] == ["/bin/echo", "it's", "$HOME", "a b"]


@pytest.mark.parametrize(("repo", "name"), [("library/redis", "redis"),
                                           ("a/My_App.v2", "my-app-v2"), ("x/__", "oci")])
def test_guest_name(repo: str, name: str) -> None:
    assert guest_name(repo) == name
