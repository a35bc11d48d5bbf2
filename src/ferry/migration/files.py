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
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError, DeviceError
from ferry.migration.channel import StreamChannel
from ferry.migration.config import DeviceConfig, MigrationConfig
from ferry.migration.destination import DestinationDevice, Receiver, ReceiveReport
from ferry.migration.limits import check_device_name, check_free_space
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


def _check_source_path(dev: DeviceConfig) -> None:
    """A device to serve must be an existing regular file or block device."""
    try:
        mode = dev.path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{dev.name}: cannot use {dev.path}: {exc.strerror}") from exc
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ConfigError(f"{dev.name}: {dev.path} is not a regular file or block device")


def open_source_files(devices: Sequence[DeviceConfig]) -> SourceGroup:
    if not devices:
        raise ConfigError("no devices to serve")
    for dev in devices:
        _check_source_path(dev)
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
    # No idle deadline here: a receiver busy writing sends nothing back for as
    # long as pre-copy lasts, and it has authenticated by now.
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


def check_target_directory(directory: Path) -> None:
    """Refuse, before anything is received, a target that cannot be a directory
    of ours: an existing non-directory, or one (or its nearest existing
    ancestor, if it is still to be created) that we cannot write."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{existing} is not writable")


def make_target_directory(directory: Path) -> None:
    """Create the directory devices are received into; ConfigError if it cannot be one."""
    check_target_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {directory}: {exc.strerror}") from exc


def _partial(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


class FileReceiver:
    """Receives a device group into ``directory``/<device name>."""

    def __init__(self, directory: Path, *, overwrite: bool = False) -> None:
        self.directory = directory
        self.overwrite = overwrite
        self.stacks: list[DestinationStack] = []
        self.final_paths: list[Path] = []

    async def open_devices(self, infos: Sequence[DeviceInfo]) -> list[DestinationDevice]:
        """Create ``<name>.partial`` for every device, once the whole group is
        known to fit (the receiver has checked its limits already)."""
        finals: list[Path] = []
        for info in infos:
            check_device_name(info.name)  # the receiver checked; this is the file layer's own
            final = self.directory / info.name
            if final.exists() and not self.overwrite:
                raise ConfigError(f"{final} exists; refusing to overwrite it (use --overwrite)")
            finals.append(final)
        make_target_directory(self.directory)
        check_free_space(self.directory, infos)
        for info, final in zip(infos, finals, strict=True):
            partial = _partial(final)
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            # Recorded before it exists, so discard() removes it whatever fails next.
            self.final_paths.append(final)
            file = FileDevice(partial, size_bytes=info.size_bytes, create=True, name=info.name)
            try:
                stack = destination_stack(info.name, file, info.block_size_bytes)
            except BaseException:
                file.close_sync()
                raise
            self.stacks.append(stack)
        return [s.destination_device() for s in self.stacks]

    async def commit(self) -> None:
        """Make every received device durable and move it to its final name."""
        for stack in self.stacks:
            await stack.local.flush()
            await stack.close()
        for final in self.final_paths:
            os.replace(_partial(final), final)
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
                _partial(final).unlink()


async def migrate_in(
    stream: Stream,
    directory: Path,
    config: MigrationConfig,
    *,
    overwrite: bool = False,
    on_start: Callable[[Receiver], None] | None = None,
) -> ReceiveReport:
    """Receive a device group over ``stream`` into files in ``directory``.

    The source's description is checked against ``config.limits`` before any
    file is created; on any failure every ``.partial`` file is removed.
    """
    files = FileReceiver(directory, overwrite=overwrite)
    channel = StreamChannel(stream, idle_timeout_s=config.idle_timeout_s)
    receiver = Receiver(channel, files.open_devices, mode=config.mode, limits=config.limits)
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
