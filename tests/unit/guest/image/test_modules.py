from __future__ import annotations

import pytest

from ferry.guest.image.errors import ModuleError
from ferry.guest.image.modules import ModuleIndex, module_name

R = "kernel/drivers/virtio/"
FAKE_DEP = f"""\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
{R}virtio_mmio.ko: {R}virtio.ko {R}virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: {R}virtio.ko {R}virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko
kernel/lib/crc16.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
"""


def test_dependencies_come_first_each_once() -> None:
    idx = ModuleIndex.parse_modules_dep(FAKE_DEP)
    order = idx.load_order(["virtio_mmio", "virtio_blk", "virtio_net", "ext4"])
    assert order == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_mmio.ko",
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
        "kernel/lib/crc16.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/fs/ext4/ext4.ko",
    ]
    for i, path in enumerate(order):  # every dependency precedes its user
        for dep in idx.depends[module_name(path)]:
            assert order.index(idx.paths[dep]) < i


def test_dash_and_underscore_are_equal_and_compressed_suffix_stripped() -> None:
    idx = ModuleIndex.parse_modules_dep(FAKE_DEP)
    assert module_name("a/b/virtio-rng.ko.xz") == "virtio_rng"
    assert idx.load_order(["virtio-rng"])[-1] == "kernel/drivers/char/hw_random/virtio-rng.ko.xz"


def test_unknown_module_and_missing_dependency() -> None:
    idx = ModuleIndex.parse_modules_dep(FAKE_DEP)
    with pytest.raises(ModuleError) as info:
        idx.load_order(["nope"])
    assert info.value.module == "nope"
    broken = ModuleIndex.parse_modules_dep("kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(ModuleError, match="needed by a"):
        broken.load_order(["a"])


def test_cycle_is_reported() -> None:
    idx = ModuleIndex.parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(ModuleError, match="cycle"):
        idx.load_order(["a"])


def test_malformed_line() -> None:
    with pytest.raises(ModuleError):
        ModuleIndex.parse_modules_dep("kernel/a.ko kernel/b.ko\n")


def test_render_round_trips() -> None:
    idx = ModuleIndex.parse_modules_dep(FAKE_DEP)
    again = ModuleIndex.parse_modules_dep(idx.to_modules_dep())
    assert again == idx
