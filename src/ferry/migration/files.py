"""Migrating device files: what ``ferry serve`` and ``ferry receive`` do.

The source opens each configured file read-only through a source stack and
migrates it to whoever connects. The destination creates each device the
source describes as ``<name>.partial`` in its directory and renames the files
into place only after every device has been verified, so a failed or
interrupted migration never replaces or half-writes a file under its final
name.

Files served this way must only change through ferry while they migrate (an
outside writer's changes are invisible to dirty tracking); the VM layer
migrates live devices through the same machinery with its own writers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.config import DeviceConfig, MigrationConfig
from ferry.errors import ConfigError, DeviceError
from ferry.migration.channel import StreamChannel
from ferry.migration.destination import DestinationDevice, Receiver, ReceiveReport
from ferry.migration.report import MigrationReport
from ferry.migration.source import MigrationHooks, Migrator
from ferry.migration.stacks import DestinationStack, SourceStack, destination_stack, source_stack
from ferry.protocol.messages import DeviceInfo
from ferry.storage.providers.file import FileDevice
from ferry.transport.base import Stream

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


@dataclass(slots=True)
class SourceGroup:
    stacks: list[SourceStack]
    configs: list[DeviceConfig]

    async def close(self) -> None:
        for stack in self.stacks:
            await stack.close()


def open_source_files(devices: Sequence[DeviceConfig]) -> SourceGroup:
    if not devices:
        raise ConfigError("no devices to serve")
    files: list[FileDevice] = []
    try:
        for dev in devices:
            files.append(FileDevice(dev.path, read_only=True, name=dev.name))
    except BaseException:
        for file in files:
            file.close_sync()
        raise
    return SourceGroup(
        [
            source_stack(dev.name, file, dev.block_size_bytes)
            for dev, file in zip(devices, files, strict=True)
        ],
        list(devices),
    )


async def migrate_out(
    group: SourceGroup,
    stream: Stream,
    config: MigrationConfig,
    *,
    hooks: MigrationHooks | None = None,
    on_start: Callable[[Migrator], None] | None = None,
) -> MigrationReport:
    """Migrate ``group`` over ``stream`` and close the stream."""
    channel = StreamChannel(stream)
    migrator = Migrator(
        [
            dataclasses.replace(
                s.source_device(compression=config.compression),
                max_dirty_blocks=d.max_dirty_blocks,
            )
            for s, d in zip(group.stacks, group.configs, strict=True)
        ],
        channel,
        policy=config.policy,
        mode=config.mode,
        hooks=hooks,
        concurrency=config.concurrency,
        verify_source=config.verify_source,
    )
    if on_start is not None:
        on_start(migrator)
    try:
        return await migrator.run()
    finally:
        await channel.aclose()


class FileReceiver:
    """Receives a device group into ``directory``/<device name>."""

    def __init__(self, directory: Path, *, overwrite: bool = False) -> None:
        self.directory = directory
        self.overwrite = overwrite
        self.stacks: list[DestinationStack] = []
        self.final_paths: list[Path] = []

    async def open_devices(self, infos: Sequence[DeviceInfo]) -> list[DestinationDevice]:
        self.directory.mkdir(parents=True, exist_ok=True)
        for info in infos:
            if "/" in info.name or info.name in (".", "..") or not info.name:
                raise ConfigError(f"source sent an unusable device name {info.name!r}")
            final = self.directory / info.name
            if final.exists() and not self.overwrite:
                raise ConfigError(f"{final} exists; refusing to overwrite it (use --overwrite)")
            partial = final.with_name(final.name + PARTIAL_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            file = FileDevice(partial, size_bytes=info.size_bytes, create=True, name=info.name)
            self.stacks.append(destination_stack(info.name, file, info.block_size_bytes))
            self.final_paths.append(final)
        return [s.destination_device() for s in self.stacks]

    async def commit(self) -> None:
        """Make every received device durable and move it to its final name."""
        for stack in self.stacks:
            await stack.local.flush()
            await stack.close()
        for final in self.final_paths:
            os.replace(final.with_name(final.name + PARTIAL_SUFFIX), final)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def discard(self) -> None:
        for stack in self.stacks:
            with contextlib.suppress(DeviceError):
                await stack.close()
        for final in self.final_paths:
            with contextlib.suppress(FileNotFoundError):
                final.with_name(final.name + PARTIAL_SUFFIX).unlink()


async def migrate_in(
    stream: Stream,
    directory: Path,
    config: MigrationConfig,
    *,
    overwrite: bool = False,
    on_start: Callable[[Receiver], None] | None = None,
) -> ReceiveReport:
    """Receive a device group over ``stream`` into files in ``directory``."""
    files = FileReceiver(directory, overwrite=overwrite)
    channel = StreamChannel(stream)
    receiver = Receiver(channel, files.open_devices, mode=config.mode)
    if on_start is not None:
        on_start(receiver)
    try:
        report = await receiver.run()
        await files.commit()
        return report
    except BaseException:
        await files.discard()
        raise
    finally:
        await channel.aclose()
