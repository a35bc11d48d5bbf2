"""BdiTuner against a fake sysfs directory: what it writes, what it restores."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.expose.fuse.bdi import BdiTuner, BdiTuning, read_values

KERNEL_DEFAULTS = {
    "max_ratio": "1",
    "max_ratio_fine": "10000",
    "max_bytes": "49812316",
    "strict_limit": "1",
    "read_ahead_kb": "128",
}


@pytest.fixture
def bdi(tmp_path: Path) -> Path:
    for name, value in KERNEL_DEFAULTS.items():
        (tmp_path / name).write_text(value + "\n")
    return tmp_path


def test_apply_writes_the_tuning_and_restore_puts_back_every_value(bdi: Path) -> None:
    tuner = BdiTuner(bdi)
    tuner.apply(BdiTuning(read_ahead_kb=1024))
    values = read_values(bdi)
    assert values["strict_limit"] == "0"
    assert values["max_ratio"] == "100"
    assert values["read_ahead_kb"] == "1024"
    tuner.restore()
    # The ratio comes back through the exact parts-per-million file.
    assert read_values(bdi) == {**KERNEL_DEFAULTS, "max_ratio": "100"}
    assert (bdi / "max_ratio_fine").read_text() == "10000"
    tuner.restore()  # idempotent


def test_max_bytes_instead_of_ratio(bdi: Path) -> None:
    tuner = BdiTuner(bdi)
    tuner.apply(BdiTuning(max_ratio_percent=None, max_bytes=1 << 30, read_ahead_kb=None))
    assert (bdi / "max_bytes").read_text() == str(1 << 30)
    assert (bdi / "read_ahead_kb").read_text().strip() == "128"


def test_missing_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "max_ratio").write_text("1\n")
    tuner = BdiTuner(tmp_path)
    tuner.apply(BdiTuning())
    assert (tmp_path / "max_ratio").read_text() == "100"
    tuner.restore()
    assert (tmp_path / "max_ratio").read_text() == "1"


def test_restore_tolerates_a_vanished_bdi(bdi: Path) -> None:
    tuner = BdiTuner(bdi)
    tuner.apply(BdiTuning())
    for path in bdi.iterdir():
        path.unlink()
    bdi.rmdir()
    tuner.restore()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_ratio_percent": 0},
        {"max_ratio_percent": 101},
        {"max_ratio_percent": 50, "max_bytes": 1},
        {"max_ratio_percent": None, "max_bytes": 0},
        {"read_ahead_kb": -1},
    ],
)
def test_invalid_tuning_is_rejected(kwargs: dict[str, int | None]) -> None:
    with pytest.raises(ConfigError):
        BdiTuning(**kwargs)  # type: ignore[arg-type]
