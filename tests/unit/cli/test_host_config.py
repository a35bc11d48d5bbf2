"""The CLI builds the host configuration once: the environment's, --accel on top."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ferry.cli.args import host_config
from ferry.cli.exitcodes import ExitCode
from ferry.cli.main import main
from ferry.hostconfig import Accel

ENV = {"HOME": "/home/u", "FERRY_RUN_DIR": "/r", "FERRY_ACCEL": "kvm"}


def test_the_environment_gives_the_host_config() -> None:
    host = host_config(argparse.Namespace(), ENV)
    assert (host.run_root, host.accel) == (Path("/r"), Accel.KVM)


@pytest.mark.parametrize(("flag", "want"), [("tcg", Accel.TCG), ("auto", None),
                                            (None, Accel.KVM)])
def test_accel_flag_overrides_the_environment(flag: str | None, want: Accel | None) -> None:
    assert host_config(argparse.Namespace(accel=flag), ENV).accel is want


def test_a_bad_environment_value_is_a_config_error_exit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FERRY_ACCEL", "hvf")
    monkeypatch.setenv("FERRY_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("FERRY_STATE_DIR", str(tmp_path / "state"))
    assert main(["vm", "list"]) == ExitCode.USAGE
    monkeypatch.setenv("FERRY_ACCEL", "tcg")
    assert main(["vm", "list"]) == ExitCode.OK


def test_snapshot_memory_out_of_range_is_a_usage_exit_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FERRY_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("FERRY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "pkg"
    assert main(["vm", "snapshot", "redis", "-o", str(out), "--memory-mib", "15"]) == (
        ExitCode.USAGE)
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # nothing was built
