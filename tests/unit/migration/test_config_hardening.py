"""Config and serve inputs that must be refused with one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.migration.config import DeviceConfig, load_config, parse_config
from ferry.migration.files import make_target_directory, open_source_files
from ferry.migration.limits import ReceiveLimits


@pytest.mark.parametrize(
    "doc",
    [
        {"migration": {"concurrency": 100000000}},
        {"migration": {"concurrency": 0}},
        {"migration": {"idle_timeout_s": 0}},
        {"migration": {"idle_timeout_s": float("inf")}},
        {"migration": 5},
        {"limits": {"max_devices": 0}},
        {"limits": {"max_total_blocks": 1 << 40}},
        {"limits": {"max_device_bytes": "big"}},
        {"limits": {"surprise": 1}},
        {"device": {"name": "x"}},
        {"device": [5]},
    ],
)
def test_bad_config_values_are_config_errors(doc: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        parse_config(doc)


def test_limits_section_is_read() -> None:
    config = parse_config({"limits": {"max_devices": 3, "max_total_blocks": 100}})
    assert config.migration.limits == ReceiveLimits(max_devices=3, max_total_blocks=100)
    assert parse_config({}).migration.limits == ReceiveLimits()


def test_a_config_that_is_not_utf8_is_a_one_line_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'[migration]\nmode = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_serving_a_directory_or_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        open_source_files([DeviceConfig("d", tmp_path)])
    with pytest.raises(ConfigError, match="No such file"):
        open_source_files([DeviceConfig("d", tmp_path / "missing")])


def test_a_target_that_cannot_be_a_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        make_target_directory(tmp_path / "file")
    with pytest.raises(ConfigError, match="not a directory"):
        make_target_directory(tmp_path / "file" / "sub")
    make_target_directory(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
