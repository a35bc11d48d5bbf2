"""OCI test images built here, without internet, and pushed to a local registry.

The images are assembled from Debian packages on the host's apt mirror with the
guest image builder's own pieces (:func:`ferry.guest.image.initramfs.busybox_tree`,
:func:`ferry.guest.image.rootfs.add_packages`, which copies only the shared
libraries the packages' ELF files need), written as tar layers by
:mod:`tarfile`, and put into an OCI image layout by ``umoci`` (``init``, ``new``,
``raw add-layer``, which gzips the layer and records its digests, and ``config``).
``skopeo copy oci:LAYOUT:TAG docker://HOST:PORT/REPO:TAG`` pushes them.

Images (:data:`IMAGES`):

``httpd``
    busybox-static with its ``httpd`` applet serving ``/www`` on port 8080, as user
    ``65534:65534`` with workdir ``/www`` and an ``env``; the small HTTP server.
``redis``
    ``redis-server`` (``redis-tools``) and its libraries over busybox, port 6379.
``layers``
    two hand-made layers exercising what unpacking must get right (see
    :data:`LAYERS_EXPECTED`): a whiteout, an opaque directory, a hard link,
    owners, a setuid bit, a sticky directory, a symlink.

Layers carry mtime 0 and numeric owners only, so a layer's digest depends only on its
inputs (and umoci's gzip); configs carry their creation time, so manifests differ
between builds.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferry.errors import FerryError
from ferry.guest.image import debian
from ferry.guest.image.blueprint import BUSYBOX_PACKAGE
from ferry.guest.image.initramfs import busybox_tree
from ferry.guest.image.rootfs import add_packages
from ferry.guest.image.tree import Tree


class TestImageError(FerryError):
    """Building or pushing a test image failed."""

    __test__ = False  # not a pytest test class, despite its name


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """What ``umoci config`` records in an image's config."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()  # "8080/tcp"
    architecture: str = "amd64"


@dataclass(frozen=True, slots=True)
class TestImage:
    """A test image: its layers (each a function writing a tar) and its settings."""

    __test__ = False

    name: str
    layers: tuple[Callable[[Path, Path], None], ...]  # (tar path, cache dir)
    settings: ImageSettings = field(default_factory=ImageSettings)


def _run(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as exc:
        raise TestImageError(f"cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split())
        raise TestImageError(f"{' '.join(argv[:3])} failed ({proc.returncode}): {err}")
    return proc.stdout


def tar_directory(src: Path, out: Path) -> None:
    """Write ``src`` as an uncompressed layer tar: paths relative, owners 0, mtime 0.

    Hard links inside ``src`` stay hard links (:mod:`tarfile` tracks inodes).
    """

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(src)):
            tar.add(src / name, arcname=name, filter=clean)


def _tree_layer(build: Callable[[Path], Tree]) -> Callable[[Path, Path], None]:
    def write(out: Path, cache_dir: Path) -> None:
        tree = build(cache_dir)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            root = Path(tmp) / "root"
            tree.materialize(root)
            tar_directory(root, out)

    return write


def _busybox(cache_dir: Path) -> Tree:
    pkg = debian.fetch(BUSYBOX_PACKAGE, cache_dir)
    tree = busybox_tree(pkg.root / "bin" / "busybox")
    tree.write("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                              b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    tree.write("/etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return tree


def _httpd_tree(cache_dir: Path) -> Tree:
    tree = _busybox(cache_dir)
    tree.write("/www/index.html", b"hello from an OCI image\n")
    return tree


def _redis_tree(cache_dir: Path) -> Tree:
    tree = _busybox(cache_dir)
    add_packages(tree, ["redis-tools", "redis-server"], cache_dir)
    tree.mkdir("/data", 0o755)
    return tree


# --- the "layers" image: every case unpacking must handle --------------------------

def _entry(tar: tarfile.TarFile, name: str, kind: bytes, *, mode: int, uid: int = 0,
           gid: int = 0, data: bytes = b"", linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 0
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _layers_base(out: Path, _cache_dir: Path) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        d, f = tarfile.DIRTYPE, tarfile.REGTYPE
        _entry(tar, "etc", d, mode=0o755)
        _entry(tar, "etc/passwd", f, mode=0o644, data=b"root:x:0:0:root:/root:/bin/sh\n")
        _entry(tar, "data", d, mode=0o755)
        _entry(tar, "data/keep", f, mode=0o644, data=b"keep\n")
        _entry(tar, "data/gone", f, mode=0o644, data=b"whited out by layer 2\n")
        _entry(tar, "opaque", d, mode=0o755)
        _entry(tar, "opaque/old", f, mode=0o644, data=b"hidden by the opaque marker\n")
        _entry(tar, "opaque/sub", d, mode=0o755)
        _entry(tar, "opaque/sub/older", f, mode=0o644, data=b"hidden too\n")
        _entry(tar, "links", d, mode=0o755)
        _entry(tar, "links/a", f, mode=0o644, data=b"one inode, two names\n")
        _entry(tar, "links/b", tarfile.LNKTYPE, mode=0o644, linkname="links/a")
        _entry(tar, "links/sym", tarfile.SYMTYPE, mode=0o777, linkname="a")
        _entry(tar, "owned", d, mode=0o710, uid=42, gid=43)
        _entry(tar, "owned/secret", f, mode=0o640, uid=1234, gid=5678, data=b"s\n")
        _entry(tar, "owned/setuid", f, mode=0o4755, data=b"#!/bin/sh\n")
        _entry(tar, "sticky", d, mode=0o1777)


def _layers_top(out: Path, _cache_dir: Path) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        d, f = tarfile.DIRTYPE, tarfile.REGTYPE
        _entry(tar, "data", d, mode=0o755)
        _entry(tar, "data/.wh.gone", f, mode=0o644)
        _entry(tar, "data/added", f, mode=0o600, uid=7, gid=8, data=b"layer 2\n")
        _entry(tar, "opaque", d, mode=0o755)
        _entry(tar, "opaque/.wh..wh..opq", f, mode=0o644)
        _entry(tar, "opaque/new", f, mode=0o644, data=b"only this survives\n")


LAYERS_EXPECTED: dict[str, tuple[int, int, int] | None] = {
    # guest path: (st_mode, uid, gid) after both layers, or None if it must be absent
    "/data/keep": (stat.S_IFREG | 0o644, 0, 0),
    "/data/gone": None,
    "/data/added": (stat.S_IFREG | 0o600, 7, 8),
    "/opaque/new": (stat.S_IFREG | 0o644, 0, 0),
    "/opaque/old": None,
    "/opaque/sub": None,
    "/links/a": (stat.S_IFREG | 0o644, 0, 0),
    "/links/b": (stat.S_IFREG | 0o644, 0, 0),
    "/links/sym": (stat.S_IFLNK | 0o777, 0, 0),
    "/owned": (stat.S_IFDIR | 0o710, 42, 43),
    "/owned/secret": (stat.S_IFREG | 0o640, 1234, 5678),
    "/owned/setuid": (stat.S_IFREG | 0o4755, 0, 0),
    "/sticky": (stat.S_IFDIR | 0o1777, 0, 0),
}
"""What the ``layers`` image must unpack to; ``/links/a`` and ``/links/b`` share an inode."""

HTTPD_PORT = 8080
REDIS_PORT = 6379

IMAGES: dict[str, TestImage] = {
    "httpd": TestImage("httpd", (_tree_layer(_httpd_tree),), ImageSettings(
        entrypoint=("/bin/busybox", "httpd", "-f", "-v"),
        cmd=("-p", str(HTTPD_PORT), "-h", "/www"),
        env=("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "GREETING=hello"),
        workdir="/www", user="65534:65534", exposed_ports=(f"{HTTPD_PORT}/tcp",))),
    "redis": TestImage("redis", (_tree_layer(_redis_tree),), ImageSettings(
        entrypoint=("redis-server",),
        cmd=("--bind", "0.0.0.0", "--protected-mode", "no", "--save", ""),
        env=("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",),
        workdir="/data", exposed_ports=(f"{REDIS_PORT}/tcp",))),
    "layers": TestImage("layers", (_layers_base, _layers_top), ImageSettings(
        cmd=("/bin/sh",), env=("A=1",))),
}


def _salt_layer(salt: str) -> Callable[[Path, Path], None]:
    def write(out: Path, _cache_dir: Path) -> None:
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            _entry(tar, "etc", tarfile.DIRTYPE, mode=0o755)
            _entry(tar, "etc/ferry-test-salt", tarfile.REGTYPE, mode=0o644, data=salt.encode())

    return write


def build_layout(layout: Path, image: TestImage, *, tag: str, cache_dir: Path,
                 settings: ImageSettings | None = None, salt: str = "") -> None:
    """Add ``image`` as ``tag`` to the OCI layout ``layout`` (created if missing).

    A ``salt`` adds a last layer of its own (``/etc/ferry-test-salt``): registries store a
    blob once for all repositories, so a test that damages a layer in the registry's
    storage damages the salt layer, which no other image shares.
    """
    s = settings or image.settings
    ref = f"{layout}:{tag}"
    if not (layout / "index.json").is_file():
        _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", ref])
    with tempfile.TemporaryDirectory(prefix="ferry-layer-") as tmp:
        layers = image.layers + ((_salt_layer(salt),) if salt else ())
        for i, write in enumerate(layers):
            tar = Path(tmp) / f"layer{i}.tar"
            write(tar, cache_dir)
            _run(["umoci", "raw", "add-layer", "--image", ref, str(tar)])
    argv = ["umoci", "config", "--image", ref, "--architecture", s.architecture, "--os", "linux"]
    for e in s.entrypoint:
        argv += ["--config.entrypoint", e]
    for c in s.cmd:
        argv += ["--config.cmd", c]
    for v in s.env:
        argv += ["--config.env", v]
    for p in s.exposed_ports:
        argv += ["--config.exposedports", p]
    if s.workdir:
        argv += ["--config.workingdir", s.workdir]
    if s.user:
        argv += ["--config.user", s.user]
    _run(argv)


def push(layout: Path, tag: str, dest: str, *,
         credentials: tuple[str, str] | None = None) -> None:
    """``skopeo copy`` the layout's ``tag`` to ``docker://dest`` (a loopback registry: its
    certificate, if any, is not verified; ``credentials`` log in)."""
    creds = ["--dest-creds", ":".join(credentials)] if credentials else []
    _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *creds,
          f"oci:{layout}:{tag}", f"docker://{dest}"])


def build_and_push(name: str, registry: str, *, cache_dir: Path, work_dir: Path,
                   tag: str = "test", repo: str | None = None,
                   settings: ImageSettings | None = None, salt: str = "",
                   credentials: tuple[str, str] | None = None) -> str:
    """Build test image ``name`` and push it as ``REGISTRY/REPO:TAG``; return that reference."""
    image = IMAGES[name]
    layout = work_dir / f"layout-{repo or name}-{tag}"
    build_layout(layout, image, tag=tag, cache_dir=cache_dir, settings=settings, salt=salt)
    ref = f"{registry}/{repo or name}:{tag}"
    push(layout, tag, ref, credentials=credentials)
    return ref
