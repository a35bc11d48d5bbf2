"""``migration/files.py``, what ``ferry serve`` and ``ferry receive`` do, on tmp files.

Both halves run in one event loop over a memory stream pair: the real
``open_source_files`` + ``migrate_out`` against the real ``migrate_in``. What
is checked is what the module promises: devices arrive byte for byte (one
with a partial last block), nothing appears under a final name before every
device was verified, an existing target is refused unless ``overwrite``, and a
failed transfer leaves no ``.partial`` file and the existing file as it was.
(Hostile sources, geometry limits and garbage after the files were created
are covered by ``test_hostile_source.py``.)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ferry.errors import ConfigError, FerryError, IntegrityError
from ferry.migration.channel import StreamChannel
from ferry.migration.config import DeviceConfig, MigrationConfig
from ferry.migration.destination import ReceiveReport
from ferry.migration.files import (
    PARTIAL_SUFFIX,
    SourceGroup,
    migrate_in,
    migrate_out,
    open_source_files,
)
from ferry.migration.report import MigrationReport
from ferry.migration.source import MigrationHooks, Migrator
from ferry.transport.base import Stream
from ferry.transport.memory import memory_stream_pair

from .test_migrator import Tamper

BLOCK = 64 * 1024
SIZES = {"disk": 5 * BLOCK + 1000, "swap": 2 * BLOCK}  # disk ends in a partial block


def _write_sources(root: Path) -> list[DeviceConfig]:
    root.mkdir()
    configs = []
    for i, (name, size) in enumerate(SIZES.items()):
        path = root / f"{name}.img"
        path.write_bytes(os.urandom(size // 2) + bytes([i + 1]) * (size - size // 2))
        configs.append(DeviceConfig(name, path, block_size_bytes=BLOCK))
    return configs


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def _transfer(
    configs: list[DeviceConfig],
    into: Path,
    *,
    overwrite: bool = False,
    hooks: MigrationHooks | None = None,
    tamper: bool = False,
) -> tuple[MigrationReport | BaseException, ReceiveReport | BaseException]:
    """Run source and destination to the end; each side's report or its error."""
    a, b = memory_stream_pair()
    config = MigrationConfig(block_size_bytes=BLOCK)

    async def send(stream: Stream) -> MigrationReport:
        group = open_source_files(configs)
        try:
            if tamper:
                return await _tampering_source(group, stream)
            return await migrate_out(group, stream, config, hooks=hooks)
        finally:
            await group.close()

    results = await asyncio.gather(send(a), migrate_in(b, into, config, overwrite=overwrite),
                                   return_exceptions=True)
    return results[0], results[1]


async def _tampering_source(group: SourceGroup, stream: Stream) -> MigrationReport:
    channel = Tamper(StreamChannel(stream))
    try:
        return await Migrator([s.source_device() for s in group.stacks], channel).run()
    finally:
        await channel.aclose()


async def test_devices_arrive_intact(tmp_path: Path) -> None:
    configs = _write_sources(tmp_path / "src")
    into = tmp_path / "into" / "new"  # created on demand
    sent, received = await _transfer(configs, into)
    assert isinstance(sent, MigrationReport), sent
    assert isinstance(received, ReceiveReport), received
    assert received.verified
    assert _names(into) == sorted(SIZES)
    for dev in configs:
        assert (into / dev.name).read_bytes() == dev.path.read_bytes()


async def test_partial_files_are_renamed_only_after_verification(tmp_path: Path) -> None:
    configs = _write_sources(tmp_path / "src")
    into = tmp_path / "into"
    seen: list[list[str]] = []

    async def at_handoff() -> None:
        # The destination runs the devices now, but has verified none of them yet.
        seen.append(_names(into))

    _, received = await _transfer(configs, into, hooks=MigrationHooks(after_handoff=at_handoff))
    assert isinstance(received, ReceiveReport), received
    assert seen == [sorted(n + PARTIAL_SUFFIX for n in SIZES)]
    assert _names(into) == sorted(SIZES)


async def test_a_device_that_fails_its_hash_check_is_never_renamed(tmp_path: Path) -> None:
    configs = _write_sources(tmp_path / "src")
    into = tmp_path / "into"
    _, received = await _transfer(configs, into, tamper=True)
    assert isinstance(received, IntegrityError), received
    assert _names(into) == []


async def test_an_existing_target_is_refused_without_overwrite(tmp_path: Path) -> None:
    configs = _write_sources(tmp_path / "src")
    into = tmp_path / "into"
    into.mkdir()
    (into / "swap").write_bytes(b"keep me")
    sent, received = await _transfer(configs, into)
    assert isinstance(received, ConfigError), received
    assert "--overwrite" in str(received)
    assert isinstance(sent, FerryError)  # the source learns it was refused
    assert _names(into) == ["swap"]
    assert (into / "swap").read_bytes() == b"keep me"


async def test_overwrite_replaces_an_existing_target(tmp_path: Path) -> None:
    configs = _write_sources(tmp_path / "src")
    into = tmp_path / "into"
    into.mkdir()
    (into / "swap").write_bytes(b"old")
    _, received = await _transfer(configs, into, overwrite=True)
    assert isinstance(received, ReceiveReport), received
    assert (into / "swap").read_bytes() == configs[1].path.read_bytes()


async def test_a_failed_transfer_leaves_no_partial_and_the_old_file_alone(tmp_path: Path) -> None:
    configs = _write_sources(tmp_path / "src")
    into = tmp_path / "into"
    into.mkdir()
    (into / "disk").write_bytes(b"the old disk")

    async def die() -> None:
        assert _names(into) == sorted(["disk", *(n + PARTIAL_SUFFIX for n in SIZES)])
        raise OSError("source host lost power")

    sent, received = await _transfer(configs, into, overwrite=True,
                                     hooks=MigrationHooks(suspend=die))
    assert isinstance(sent, BaseException)
    assert isinstance(received, FerryError), received
    assert _names(into) == ["disk"]
    assert (into / "disk").read_bytes() == b"the old disk"


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_source_must_be_an_existing_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConfigError, match="x"):
        open_source_files([DeviceConfig("x", path)])
