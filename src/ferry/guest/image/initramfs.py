"""The initramfs: busybox, the virtio modules and ferry's stage-1 ``/init``.

The Debian cloud kernel builds virtio-mmio, virtio-blk, virtio-net and
virtio-console as modules (ext4 and jbd2 are built in), so the initramfs
carries them and ``/init`` loads them in dependency order from
``/etc/ferry/modules`` with busybox ``insmod`` (no ``modprobe``, no
``modules.dep`` needed in the guest). Compressed modules (``.ko.xz``,
``.ko.zst``, ``.ko.gz``) are decompressed while building, since busybox
``insmod`` support for them depends on its build options.

The archive is ``newc`` cpio, optionally gzip'd (level 1: the payload is a
few MiB and TCG decompression is slower than reading the bytes; see
docs/blueprints.md for the measurement).
"""

from __future__ import annotations

import gzip
import lzma
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ferry.guest import files as guest
from ferry.guest.image.errors import ImageError
from ferry.guest.image.kernel import Kernel
from ferry.guest.image.modules import ModuleIndex
from ferry.guest.image.tree import Tree, write_newc

# virtio_mmio: microvm's transport; blk/net/console: disk, network, agent
# channel; virtio_rng seeds the guest's entropy pool from the host.
DEFAULT_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng")

BASE_DIRS = ("/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/etc", "/mnt", "/var",
             "/usr/bin", "/usr/sbin", "/bin", "/sbin", "/ferry/agent")


def _decompress(data: bytes, name: str) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def busybox_tree(busybox: Path) -> Tree:
    """A tree with a static busybox, a symlink for each applet and the base dirs."""
    try:
        listing = subprocess.run([str(busybox), "--list-full"], capture_output=True,
                                 text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"cannot list busybox applets of {busybox}: {exc}") from exc
    tree = Tree()
    for d in BASE_DIRS:
        tree.mkdir(d)
    tree.mkdir("/tmp", 0o1777)
    tree.mkdir("/root", 0o700)
    tree.copy("/bin/busybox", busybox, mode=0o755)
    for applet in listing.split():
        if applet != "bin/busybox":
            tree.symlink("/" + applet, "/bin/busybox")
    tree.chardev("/dev/console", 5, 1)
    tree.chardev("/dev/null", 1, 3, mode=0o666)
    return tree


def add_guest_files(tree: Tree, files: Sequence[tuple[str, str, int]]) -> None:
    """Install ferry's guest scripts (``ferry.guest.files``) into ``tree``."""
    for dest, name, mode in files:
        tree.copy(dest, guest.GUEST_FILES_DIR / name, mode=mode)


def add_modules(tree: Tree, kernel: Kernel, modules: Sequence[str]) -> list[str]:
    """Add ``modules`` and their dependencies; write the load order; return it."""
    index = ModuleIndex.for_tree(kernel.modules_dir)
    order = index.load_order(list(modules))
    loaded: list[str] = []
    base = f"/lib/modules/{kernel.release}"
    for rel in order:
        src = kernel.modules_dir / rel
        plain = rel
        for suffix in (".xz", ".zst", ".gz"):
            if rel.endswith(suffix):
                plain = rel[: -len(suffix)]
        tree.write(f"{base}/{plain}", _decompress(src.read_bytes(), rel))
        loaded.append(plain)
    tree.write("/etc/ferry/modules", "".join(m + "\n" for m in loaded).encode())
    return loaded


def initramfs_tree(
    kernel: Kernel, busybox: Path, *, modules: Sequence[str] = DEFAULT_MODULES,
    blueprint_env: bytes | None = None,
) -> Tree:
    """Everything the initramfs holds; stage-2 files too, for disk-less boots."""
    tree = busybox_tree(busybox)
    add_modules(tree, kernel, modules)
    add_guest_files(tree, guest.STAGE1_FILES + guest.STAGE2_FILES)
    tree.symlink("/sbin/init", "/bin/busybox")
    tree.mkdir("/newroot")
    if blueprint_env is not None:
        tree.write("/ferry/blueprint.env", blueprint_env)
    return tree


def write_initramfs(tree: Tree, path: Path, *, compress: bool) -> None:
    """Write ``tree`` to ``path`` as newc cpio, gzip'd at level 1 if ``compress``."""
    with path.open("wb") as raw:
        if compress:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
                write_newc(tree, gz)
        else:
            write_newc(tree, raw)
