"""A running VM mirrored to a bucket (``ferry vm run --mirror s3://BUCKET/PREFIX``).

:mod:`ferry.s3.mirror` does the copying, checkpoints and retries; this module
gives it the VM: the mirror trackers :func:`~ferry.vm.runner.run_vm` put in
front of guest RAM and the disks, the FUSE flush, and the consistent pause.

The consistent point. A checkpoint needs guest RAM, the disks and QEMU's device
state of one instant. :meth:`QemuSide.paused` takes it as a suspend does: QMP
``stop`` (QEMU drains and flushes its block layer, so every disk write is in
the disk's stack), ``fsync`` of the RAM file (every dirty guest page written
back through FUSE into the memory stack), the device-state save
(``x-ignore-shared``: registers and device models, no RAM), then the mirror
copies the blocks written since its last copy, and ``cont``. The pause is
measured (:attr:`MirrorStatus.last_pause_ms`); uploads happen after it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError
from ferry.qemu import QemuVM
from ferry.s3.config import S3Config
from ferry.s3.device import Layout
from ferry.s3.mirror import Mirror, MirrorConfig, VMIdentity
from ferry.s3.store import ObjectStore
from ferry.s3.url import S3URL
from ferry.vm.runner import RunningVM


@dataclass(frozen=True, slots=True)
class MirrorSpec:
    """Where and how often to mirror (``--mirror``, ``--mirror-interval``, S3 options)."""

    url: str
    interval_s: float = 2.0
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    def __post_init__(self) -> None:
        layout_of(S3URL.parse(self.url))
        MirrorConfig(interval_s=self.interval_s, retry_max_s=max(30.0, self.interval_s))

    def s3_config(self) -> S3Config:
        return S3Config(endpoint_url=self.endpoint_url, region=self.region,
                        profile=self.profile)

    def store(self) -> ObjectStore:
        return ObjectStore.connect(self.s3_config(), S3URL.parse(self.url).bucket)

    def layout(self) -> Layout:
        return layout_of(S3URL.parse(self.url))

    def to_json(self) -> dict[str, object]:
        return {"url": self.url, "interval_s": self.interval_s,
                "endpoint_url": self.endpoint_url, "region": self.region,
                "profile": self.profile}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> MirrorSpec:
        def opt(key: str) -> str | None:
            value = d.get(key)
            return None if value is None else str(value)
        interval = d.get("interval_s", 2.0)
        if not isinstance(interval, int | float):
            raise ConfigError(f"bad mirror interval {interval!r}")
        return cls(str(d["url"]), float(interval), opt("endpoint_url"), opt("region"),
                   opt("profile"))


def layout_of(url: S3URL) -> Layout:
    """A VM's prefix ``s3://BUCKET/PREFIX`` as the root of its objects and manifests."""
    prefix = url.key.strip("/")
    if not prefix:
        raise ConfigError(f"{url}: give a prefix for the VM, e.g. s3://{url.bucket}/web1")
    return Layout(root=prefix + "/")


class QemuSide:
    """The mirror's view of a QEMU VM on ferry's FUSE RAM (:class:`~ferry.s3.mirror.VMSide`)."""

    def __init__(self, qemu: QemuVM, state_file: Path) -> None:
        self.qemu = qemu
        self.state_file = state_file

    async def flush(self) -> None:
        await self.qemu.flush_memory()

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[bytes]:
        try:
            await self.qemu.save_device_state(self.state_file)  # pause, fsync, save
            yield self.state_file.read_bytes()
        finally:
            await self.qemu.resume()
            self.state_file.unlink(missing_ok=True)


def mirror_of(vm: RunningVM, spec: MirrorSpec, *, work_dir: Path,
              busy: Callable[[], bool] = lambda: False) -> Mirror:
    """A :class:`Mirror` of ``vm`` (run with ``mirror_tracking``) to ``spec``.

    The S3 devices' staging files (up to the size of RAM and disks, sparse) go in the
    VM's state dir, on disk; the device state of a pause passes through ``work_dir``
    (the run dir: small, tmpfs)."""
    if not vm.mirror_sources:
        raise ConfigError("the VM was not started with mirror tracking")
    package = vm.package
    manifest = package.manifest
    identity = VMIdentity(
        vm.vm_id, package.package_id, manifest.to_json(),
        (package.directory / manifest.kernel).read_bytes(),
        (package.directory / manifest.initramfs).read_bytes())
    side = QemuSide(vm.qemu, work_dir / "mirror-state.bin")
    return Mirror(spec.store(), spec.layout(), vm.mirror_sources, side, identity, url=spec.url,
                  config=MirrorConfig(interval_s=spec.interval_s,
                                      retry_max_s=max(30.0, spec.interval_s),
                                      staging_dir=vm.state_dir),
                  clock_ns=time.time_ns, busy=busy)
