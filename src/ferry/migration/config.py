"""ferry's TOML configuration for storage migration (``ferry serve`` / ``ferry receive``).

Every key is optional; the defaults are the library's. See docs/cli.md::

    [migration]
    block_size_bytes = 65536      # per device unless a [[device]] says otherwise
    concurrency = 4               # block transfers in flight
    mode = "hybrid"               # or "precopy-only", or "postcopy" (hand over first)
    compression = "none"          # "zstd" or "lz4" for slow links
    verify_source = false         # rehash the source at completion too
    idle_timeout_s = 60.0         # the receiver gives up on a source silent this long

    [migration.policy]
    max_dirty_blocks = 200
    min_cycles_below = 5
    max_cycles = 20
    cycle_throttle_s = 0.5
    max_cycles_without_progress = 5
    max_resend_ratio = 1.0        # dirty cycles re-send at most 1x the devices' size (0: no cap)
    stop_on_dirty_rate = true     # stop once the next cycle is predicted not to shrink

    [limits]                      # what a receiver accepts from a source (docs/security.md)
    max_devices = 256
    max_device_bytes = 1099511627776      # 1 TiB
    max_total_bytes = 4398046511104       # 4 TiB, and never more than the free disk space
    max_total_blocks = 16777216

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
from ferry.migration.limits import ReceiveLimits
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


MAX_CONCURRENCY = 256
"""Block transfers in flight; each holds up to a frame (16 blocks) of data,
so this bounds the source's buffers (4 already saturate loopback)."""

MAX_IDLE_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES
    concurrency: int = 4
    mode: Mode = Mode.HYBRID
    compression: Compression = Compression.NONE
    verify_source: bool = False
    policy: DirtyPolicy = field(default_factory=DirtyPolicy)
    idle_timeout_s: float = 60.0
    limits: ReceiveLimits = field(default_factory=ReceiveLimits)

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigError(f"migration.concurrency must be in 1..{MAX_CONCURRENCY}")
        if not 0 < self.idle_timeout_s <= MAX_IDLE_TIMEOUT_S:
            raise ConfigError(f"migration.idle_timeout_s must be in (0, {MAX_IDLE_TIMEOUT_S:g}]")


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


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, not {value!r}")
    return dict(value)


def _no_extra(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(table))}")


def _enum(enum_type: Any, value: str, where: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_type)
        raise ConfigError(f"{where} must be one of {choices}, not {value!r}") from None


def _limits(table: dict[str, Any]) -> ReceiveLimits:
    d = ReceiveLimits()
    limits = ReceiveLimits(
        **{
            name: _take(table, name, int, getattr(d, name), "limits")
            for name in ("max_devices", "max_device_bytes", "max_total_bytes", "max_total_blocks")
        }
    )
    _no_extra(table, "limits")
    return limits


def parse_config(data: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate a parsed TOML document. Relative paths are relative to ``base_dir``."""
    data = dict(data)
    mig = _table(data.pop("migration", {}), "migration")
    pol = _table(mig.pop("policy", {}), "migration.policy")
    d = DirtyPolicy()
    policy = DirtyPolicy(
        max_dirty_blocks=_take(
            pol, "max_dirty_blocks", int, d.max_dirty_blocks, "migration.policy"
        ),
        min_cycles_below=_take(
            pol, "min_cycles_below", int, d.min_cycles_below, "migration.policy"
        ),
        max_cycles=_take(pol, "max_cycles", int, d.max_cycles, "migration.policy"),
        max_cycles_without_progress=_take(
            pol,
            "max_cycles_without_progress",
            int,
            d.max_cycles_without_progress,
            "migration.policy",
        ),
        cycle_throttle_s=_take(
            pol, "cycle_throttle_s", float, d.cycle_throttle_s, "migration.policy"
        ),
        max_resend_ratio=_take(
            pol, "max_resend_ratio", float, d.max_resend_ratio, "migration.policy"
        ),
        stop_on_dirty_rate=_take(
            pol, "stop_on_dirty_rate", bool, d.stop_on_dirty_rate, "migration.policy"
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
        idle_timeout_s=_take(mig, "idle_timeout_s", float, 60.0, "migration"),
        limits=_limits(_table(data.pop("limits", {}), "limits")),
    )
    _no_extra(mig, "migration")
    tls = None
    if "tls" in data:
        t = _table(data.pop("tls"), "tls")
        tls = TLSConfig(*(base_dir / _take(t, k, str, "", "tls") for k in ("cert", "key", "ca")))
        _no_extra(t, "tls")
        if not all(str(p) != str(base_dir) for p in (tls.cert, tls.key, tls.ca)):
            raise ConfigError("tls needs cert, key and ca")
    devices = []
    raw_devices = data.pop("device", [])
    if not isinstance(raw_devices, list):
        raise ConfigError("device must be an array of tables ([[device]])")
    for i, raw in enumerate(raw_devices):
        where = f"device[{i}]"
        dev = _table(raw, where)
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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    return parse_config(data, path.parent)
