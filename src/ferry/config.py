"""ferry's TOML configuration for storage migration (``ferry serve`` / ``ferry receive``).

Every key is optional; the defaults are the library's. See docs/cli.md::

    [migration]
    block_size_bytes = 65536      # per device unless a [[device]] says otherwise
    concurrency = 4               # block transfers in flight
    mode = "hybrid"               # or "precopy-only", or "postcopy" (hand over first)
    compression = "none"          # "zstd" or "lz4" for slow links
    verify_source = false         # rehash the source at completion too

    [migration.policy]
    max_dirty_blocks = 200
    min_cycles_below = 5
    max_cycles = 20
    cycle_throttle_s = 0.5

    [tls]                         # mutual TLS; all three or none
    cert = "host.pem"
    key = "host.key"
    ca = "ca.pem"

    [[device]]                    # devices to serve (source) or receive into (destination)
    name = "disk"
    path = "disk.img"
    block_size_bytes = 65536
    max_dirty_blocks = 50         # this device's own dirty threshold (default: the policy's)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError
from ferry.migration.blocks import Compression
from ferry.migration.policy import DirtyPolicy, Mode
from ferry.storage.device import DEFAULT_BLOCK_SIZE_BYTES


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    path: Path
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES
    max_dirty_blocks: int | None = None  # this device's own policy threshold

    def __post_init__(self) -> None:
        if self.max_dirty_blocks is not None and self.max_dirty_blocks < 0:
            raise ConfigError(f"{self.name}: max_dirty_blocks must be >= 0")
        if not self.name or "/" in self.name or len(self.name.encode()) > 255:
            raise ConfigError(f"invalid device name {self.name!r}")
        if self.block_size_bytes <= 0 or self.block_size_bytes % 512:
            raise ConfigError(f"{self.name}: block_size_bytes must be a positive multiple of 512")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES
    concurrency: int = 4
    mode: Mode = Mode.HYBRID
    compression: Compression = Compression.NONE
    verify_source: bool = False
    policy: DirtyPolicy = field(default_factory=DirtyPolicy)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("migration.concurrency must be >= 1")


@dataclass(frozen=True, slots=True)
class Config:
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    tls: TLSConfig | None = None
    devices: tuple[DeviceConfig, ...] = ()


def _take(table: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    if key not in table:
        return default
    value = table.pop(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key} must be a {kind.__name__}, not {value!r}")
    return value


def _no_extra(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(table))}")


def _enum(enum_type: Any, value: str, where: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_type)
        raise ConfigError(f"{where} must be one of {choices}, not {value!r}") from None


def parse_config(data: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate a parsed TOML document. Relative paths are relative to ``base_dir``."""
    data = dict(data)
    mig = dict(data.pop("migration", {}))
    pol = dict(mig.pop("policy", {}))
    d = DirtyPolicy()
    policy = DirtyPolicy(
        max_dirty_blocks=_take(
            pol, "max_dirty_blocks", int, d.max_dirty_blocks, "migration.policy"
        ),
        min_cycles_below=_take(
            pol, "min_cycles_below", int, d.min_cycles_below, "migration.policy"
        ),
        max_cycles=_take(pol, "max_cycles", int, d.max_cycles, "migration.policy"),
        cycle_throttle_s=_take(
            pol, "cycle_throttle_s", float, d.cycle_throttle_s, "migration.policy"
        ),
    )
    _no_extra(pol, "migration.policy")
    block_size = _take(mig, "block_size_bytes", int, DEFAULT_BLOCK_SIZE_BYTES, "migration")
    migration = MigrationConfig(
        block_size_bytes=block_size,
        concurrency=_take(mig, "concurrency", int, 4, "migration"),
        mode=_enum(Mode, _take(mig, "mode", str, "hybrid", "migration"), "migration.mode"),
        compression=_enum(
            Compression,
            _take(mig, "compression", str, "none", "migration"),
            "migration.compression",
        ),
        verify_source=_take(mig, "verify_source", bool, False, "migration"),
        policy=policy,
    )
    _no_extra(mig, "migration")
    tls = None
    if "tls" in data:
        t = dict(data.pop("tls"))
        tls = TLSConfig(*(base_dir / _take(t, k, str, "", "tls") for k in ("cert", "key", "ca")))
        _no_extra(t, "tls")
        if not all(str(p) != str(base_dir) for p in (tls.cert, tls.key, tls.ca)):
            raise ConfigError("tls needs cert, key and ca")
    devices = []
    for i, raw in enumerate(data.pop("device", [])):
        dev = dict(raw)
        where = f"device[{i}]"
        devices.append(
            DeviceConfig(
                name=_take(dev, "name", str, "", where),
                path=base_dir / _take(dev, "path", str, "", where),
                block_size_bytes=_take(dev, "block_size_bytes", int, block_size, where),
                max_dirty_blocks=_take(dev, "max_dirty_blocks", int, None, where),
            )
        )
        _no_extra(dev, where)
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ConfigError("device names must be unique")
    _no_extra(data, "the top level")
    return Config(migration, tls, tuple(devices))


def load_config(path: Path) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return parse_config(data, path.parent)
