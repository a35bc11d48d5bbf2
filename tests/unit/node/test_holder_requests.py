"""What a detached holder gets on its stdin (ferry.node.process), and rehome()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.hostconfig import Accel, HostConfig
from ferry.live.access import Access, TLSFiles
from ferry.net import PortForward, Proto
from ferry.node.arrival import ArrivalRequest, rehome
from ferry.node.process import decode_request, encode_request
from ferry.node.supervisor import LaunchRequest
from ferry.vm.registry import VMPaths

HOST = HostConfig.from_environ({"HOME": "/home/u", "FERRY_RUN_DIR": "/run/x",
                                "FERRY_STATE_DIR": "/var/lib/x", "FERRY_ACCEL": "tcg",
                                "FERRY_QEMU_SANDBOX": "off"})
HOST_JSON = json.dumps(HOST.to_json()).encode()
FORWARDS = (PortForward("127.0.0.1", 16379, 6379),
            PortForward("0.0.0.0", 5353, 53, Proto.UDP, allow_wildcard=True))


@pytest.mark.parametrize("request_", [
    LaunchRequest("r1", Path("/cache/pkg"), HOST, FORWARDS),
    LaunchRequest("r1", None, HOST),
    LaunchRequest("r1", Path("/cache/pkg"), HOST, env={"A": "1 2", "B": ""},
                  user_data="#!/bin/sh\necho hi\n", user_data_timeout_s=5.0,
                  volumes={"data-1": "", "logs": "disk2"}),
    ArrivalRequest(HOST, Access(token="0f" * 32), listen=("10.0.0.2", 7400),
                   report_until="listening", idle_timeout_s=4.5),
    ArrivalRequest(HOST, Access(tls=TLSFiles(Path("c"), Path("k"), Path("ca"))),
                   registry=("10.0.0.3", 7500), package="redis.ferry", name="g1",
                   forwards=FORWARDS, precopy_only=True),
    ArrivalRequest(HOST, Access(insecure=True), listen=("::1", 1), forwards=()),
    LaunchRequest("warm-01", Path("/cache/pkg"), HOST, warm=True, prime_ports=(6379, 80)),
    LaunchRequest("warm-02", Path("/cache/pkg"), HOST, warm=True),
], ids=["run", "continue", "run-env-userdata-volumes", "receive", "registry", "no-forwards",
        "warm-primed", "warm-unprimed"])
def test_round_trip(request_: LaunchRequest | ArrivalRequest) -> None:
    line = encode_request(request_)
    assert line.endswith(b"\n")
    assert decode_request(line) == request_


def test_only_a_warm_vm_is_primed_and_on_tcp_ports() -> None:
    with pytest.raises(ValueError, match="only a warm VM"):
        LaunchRequest("r1", Path("/cache/pkg"), HOST, prime_ports=(6379,))
    with pytest.raises(ConfigError, match="TCP ports"):
        LaunchRequest("warm-01", Path("/cache/pkg"), HOST, warm=True, prime_ports=(0,))
    line = encode_request(LaunchRequest("warm-01", Path("/cache/pkg"), HOST, warm=True))
    bad = json.loads(line) | {"prime_ports": [70000]}
    with pytest.raises(ConfigError, match="invalid holder request"):
        decode_request(json.dumps(bad).encode())


@pytest.mark.parametrize("seconds", [0.0, -1.0, 3601.0, float("nan")])
def test_an_idle_timeout_out_of_range_is_refused(seconds: float) -> None:
    with pytest.raises(ConfigError, match="idle timeout"):
        ArrivalRequest(HOST, Access(insecure=True), listen=("::1", 1), idle_timeout_s=seconds)


def test_the_holder_gets_the_whole_host_config() -> None:
    request = decode_request(encode_request(LaunchRequest("r1", None, HOST)))
    assert request.host == HOST
    assert (request.host.accel, request.host.qemu_sandbox) == (Accel.TCG, False)
    assert request.paths == VMPaths(Path("/run/x"), Path("/var/lib/x"))


@pytest.mark.parametrize("line", [
    b"",
    b"{}\n",
    b'{"kind": "fly", "host": ' + HOST_JSON + b', "forwards": null}\n',
    b'{"kind": "run", "run_root": "/r", "state_root": "/s", "forwards": [],'
    b' "vm_id": "r1", "package_dir": null}\n',
    b'{"kind": "run", "host": ' + HOST_JSON + b', "forwards": [],'
    b' "vm_id": "BAD ID", "package_dir": null}\n',
    b'{"kind": "run", "host": ' + HOST_JSON + b', "forwards": [[1]],'
    b' "vm_id": "r1", "package_dir": null}\n',
    b'{"kind": "run", "host": {"run_root": "/r"}, "forwards": [],'
    b' "vm_id": "r1", "package_dir": null}\n',
])
def test_bad_requests_are_config_errors(line: bytes) -> None:
    with pytest.raises(ConfigError):
        decode_request(line)


def test_rehome_keeps_loopback_and_moves_the_rest_to_the_listen_address() -> None:
    source = (PortForward("127.0.0.1", 1, 2), PortForward("10.0.0.1", 16379, 6379),
              PortForward("0.0.0.0", 53, 53, Proto.UDP, allow_wildcard=True))
    assert rehome(source, "10.0.0.2") == (
        PortForward("127.0.0.1", 1, 2), PortForward("10.0.0.2", 16379, 6379),
        PortForward("10.0.0.2", 53, 53, Proto.UDP))
    # A registry start has no listen address: the forwards stay as they were.
    assert rehome(source, None) == source


@pytest.mark.parametrize("fields", [
    {"env": {"A": "1"}}, {"user_data": "#!/bin/sh\n"}, {"volumes": {"v": ""}},
])
def test_a_continued_vm_takes_no_environment_user_data_or_volumes(
        fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="continued VM"):
        LaunchRequest("r1", None, HOST, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [
    {"env": {"1A": "x"}}, {"user_data": "plain text"}, {"volumes": {"../v": ""}},
])
def test_a_launch_request_checks_what_a_holder_gets(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        LaunchRequest("r1", Path("/cache/pkg"), HOST, **fields)  # type: ignore[arg-type]
