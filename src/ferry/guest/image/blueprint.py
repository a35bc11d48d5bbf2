"""Blueprints: declarative guest images, and building them with a cache.

A blueprint is a small TOML file (format in docs/blueprints.md)::

    name = "redis"
    memory_mib = 256
    disk_size_mib = 96
    packages = ["redis-tools", "redis-server"]

    [[files]]
    src = "redis.conf"          # relative to the blueprint file
    dest = "/etc/redis/ferry.conf"

    [workload]
    command = "redis-server --bind 0.0.0.0 --protected-mode no"
    readiness = "redis-cli ping | grep -q PONG"

:func:`build_blueprint` turns it into a kernel, an initramfs and an ext4
root disk. The result is stored in the cache under a SHA-256 of everything
that goes in (blueprint, file contents, package and kernel versions, ferry's
guest scripts, :data:`IMAGE_FORMAT`), so an unchanged blueprint is rebuilt
never, and a changed input always is. The guest's memory size is not an
input: it is the machine's, not the image's (nothing built depends on it), so
one image serves every ``memory_mib`` (:meth:`Blueprint.with_memory`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError
from ferry.guest import files as guest
from ferry.guest.agent.hooks import AGENT_PATH, HOOKS_PATH, AgentSpec
from ferry.guest.image import agent as agent_build
from ferry.guest.image import debian
from ferry.guest.image.cache import building
from ferry.guest.image.errors import BlueprintError, ImageError
from ferry.guest.image.initramfs import (
    DEFAULT_MODULES,
    add_guest_files,
    busybox_tree,
    initramfs_tree,
    write_initramfs,
)
from ferry.guest.image.kernel import Kernel, fetch_kernel
from ferry.guest.image.rootfs import add_packages, write_ext4
from ferry.shape import check_memory_mib, check_vcpus

log = logging.getLogger(__name__)

# Bump when the image layout changes so old cache entries are not reused.
IMAGE_FORMAT = 1
BLUEPRINTS_DIR = Path(__file__).resolve().parent.parent / "blueprints"
BUSYBOX_PACKAGE = "busybox-static"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KNOWN_KEYS = {"name", "memory_mib", "vcpus", "disk_size_mib", "packages", "files", "workload",
               "modules", "compress_initramfs", "agent"}
_WORKLOAD_KEYS = {"command", "readiness"}
_FILE_KEYS = {"src", "dest", "mode"}


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A host file (or directory, copied recursively) to put at ``dest`` in the guest."""

    src: Path
    dest: str
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class Blueprint:
    """A validated blueprint. Build one with :func:`load_blueprint` or directly."""

    name: str
    memory_mib: int = 256
    vcpus: int = 1
    disk_size_mib: int = 64
    packages: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    workload: str | None = None
    readiness: str | None = None
    modules: tuple[str, ...] = ()
    compress_initramfs: bool = True
    agent: AgentSpec = field(default_factory=AgentSpec)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise BlueprintError(f"name {self.name!r} must match {_NAME_RE.pattern}")
        try:
            check_memory_mib(self.memory_mib)  # the machine shape's bounds (ferry.shape)
            check_vcpus(self.vcpus)
        except ConfigError as exc:
            raise BlueprintError(str(exc)) from None
        if not 8 <= self.disk_size_mib <= 1 << 20:
            raise BlueprintError(f"disk_size_mib must be 8..1048576, got {self.disk_size_mib}")
        for p in self.packages:
            try:
                debian.validate_name(p)
            except ImageError as exc:
                raise BlueprintError(str(exc)) from exc
        for f in self.files:
            if not f.dest.startswith("/") or ".." in f.dest.split("/"):
                raise BlueprintError(f"file dest {f.dest!r} must be absolute, without '..'")
            if f.mode is not None and not 0 <= f.mode <= 0o7777:
                raise BlueprintError(f"file mode {f.mode:o} out of range")

    def with_memory(self, memory_mib: int) -> Blueprint:
        """This blueprint with ``memory_mib`` of guest RAM instead (validated as the
        file's value is: :class:`BlueprintError` outside the machine shape's bounds,
        :mod:`ferry.shape`). Its image is the same: memory is not an image input."""
        return replace(self, memory_mib=memory_mib)

    def with_vcpus(self, vcpus: int) -> Blueprint:
        """This blueprint with ``vcpus`` virtual CPUs instead (1..64); like memory, not an
        image input."""
        return replace(self, vcpus=vcpus)

    def env_file(self) -> bytes:
        """``/ferry/blueprint.env``: shell assignments the guest scripts source."""
        values = {"FERRY_HOSTNAME": self.name, "FERRY_WORKLOAD": self.workload or "",
                  "FERRY_READINESS": self.readiness or ""}
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()).encode()


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """The artefacts of a built blueprint.

    ``rootfs`` is a private copy when ``out_dir`` was given (the guest writes
    to it); ``kernel`` and ``initramfs`` are read-only.
    """

    blueprint: Blueprint
    kernel: Path
    initramfs: Path
    rootfs: Path
    manifest: Path
    key: str
    cache_hit: bool


def _expect(data: dict[str, Any], key: str, typ: type, path: str) -> Any:
    value = data[key]
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise BlueprintError(f"{key} must be {typ.__name__}, got {type(value).__name__}",
                             path=path)
    return value


def _str_list(data: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    if key not in data:
        return ()
    value = _expect(data, key, list, path)
    if not all(isinstance(v, str) for v in value):
        raise BlueprintError(f"{key} must be a list of strings", path=path)
    return tuple(value)


def parse_blueprint(text: str, *, base_dir: Path, path: str = "<blueprint>") -> Blueprint:
    """Parse and validate blueprint TOML; relative ``files.src`` are under ``base_dir``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BlueprintError(f"invalid TOML: {exc}", path=path) from exc
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise BlueprintError(f"unknown keys {sorted(unknown)}", path=path)
    if "name" not in data:
        raise BlueprintError("missing required key 'name'", path=path)
    kwargs: dict[str, Any] = {"name": _expect(data, "name", str, path)}
    for key in ("memory_mib", "vcpus", "disk_size_mib"):
        if key in data:
            kwargs[key] = _expect(data, key, int, path)
    if "compress_initramfs" in data:
        kwargs["compress_initramfs"] = _expect(data, "compress_initramfs", bool, path)
    kwargs["packages"] = _str_list(data, "packages", path)
    kwargs["modules"] = _str_list(data, "modules", path)
    files = []
    for item in data.get("files", []):
        if not isinstance(item, dict):
            raise BlueprintError("files must be an array of tables", path=path)
        if set(item) - _FILE_KEYS or not {"src", "dest"} <= set(item):
            raise BlueprintError(f"a [[files]] entry needs src and dest only, got {sorted(item)}",
                                 path=path)
        src = base_dir / _expect(item, "src", str, path)
        if not src.exists():
            raise BlueprintError(f"file {src} does not exist", path=path)
        mode = _expect(item, "mode", int, path) if "mode" in item else None
        files.append(FileSpec(src=src, dest=_expect(item, "dest", str, path), mode=mode))
    kwargs["files"] = tuple(files)
    if "workload" in data:
        workload = _expect(data, "workload", dict, path)
        extra = sorted(set(workload) - _WORKLOAD_KEYS)
        if extra:
            raise BlueprintError(f"unknown [workload] keys {extra}", path=path)
        if "command" in workload:
            kwargs["workload"] = _expect(workload, "command", str, path)
        if "readiness" in workload:
            kwargs["readiness"] = _expect(workload, "readiness", str, path)
    if "agent" in data:
        table = _expect(data, "agent", dict, path)
        try:
            kwargs["agent"] = AgentSpec.from_table(table)
        except ConfigError as exc:
            raise BlueprintError(str(exc), path=path) from exc
    try:
        return Blueprint(**kwargs)
    except BlueprintError as exc:
        raise BlueprintError(str(exc), path=path) from exc


def load_blueprint(path_or_name: str | Path) -> Blueprint:
    """Load a blueprint file, or a shipped one by name (``minimal``, ``redis``)."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = BLUEPRINTS_DIR / f"{path_or_name}.toml"
        if not shipped.is_file():
            names = sorted(p.stem for p in BLUEPRINTS_DIR.glob("*.toml"))
            raise BlueprintError(f"no blueprint file or shipped blueprint {str(path_or_name)!r} "
                                 f"(shipped: {names})")
        path = shipped
    return parse_blueprint(path.read_text(), base_dir=path.parent, path=str(path))


def _walk_files(src: Path) -> Iterator[Path]:
    if src.is_dir():
        for dirpath, _dirs, files in sorted(os.walk(src)):
            for f in sorted(files):
                yield Path(dirpath) / f
    else:
        yield src


def _input_key(bp: Blueprint, kernel_id: str, versions: dict[str, str]) -> str:
    h = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    feed("format", str(IMAGE_FORMAT).encode())
    feed("kernel", kernel_id.encode())
    feed("versions", json.dumps(versions, sort_keys=True).encode())
    feed("blueprint", repr(
        (bp.name, bp.disk_size_mib, bp.packages, bp.workload, bp.readiness, bp.modules,
         bp.compress_initramfs, [(f.dest, f.mode) for f in bp.files])).encode())
    feed("agent", repr(bp.agent).encode())
    if bp.agent.enabled:
        feed("agent-source", agent_build.agent_source_digest().encode())
    for f in bp.files:
        for host in _walk_files(f.src):
            feed(f"file:{f.dest}:{host.relative_to(f.src) if f.src.is_dir() else ''}",
                 host.read_bytes())
    for name in sorted(p.name for p in guest.GUEST_FILES_DIR.iterdir() if p.is_file()):
        feed(f"guest:{name}", (guest.GUEST_FILES_DIR / name).read_bytes())
    return h.hexdigest()


def _sparse_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"copying {src} to {dst} failed: {proc.stderr.strip()}")


def build_blueprint(
    blueprint: Blueprint | str | Path,
    out_dir: Path | None = None,
    *,
    cache_dir: Path,
) -> BuiltImage:
    """Build (or find in ``cache_dir``) the kernel, initramfs and root disk of a blueprint.

    ``cache_dir`` is the host's image cache (``HostConfig.cache_root``).

    With ``out_dir``, the root disk is copied there (sparse) so a guest can
    write to it without touching the cached image; kernel and initramfs stay
    in the cache. ``BuiltImage.cache_hit`` says whether anything was built.
    """
    bp = blueprint if isinstance(blueprint, Blueprint) else load_blueprint(blueprint)
    kernel = fetch_kernel(cache_dir)
    versions = debian.candidate_versions([BUSYBOX_PACKAGE, *bp.packages])
    key = _input_key(bp, f"{kernel.package}={kernel.version}", versions)
    entry = cache_dir / "images" / f"{bp.name}-{key[:16]}"
    cache_hit = (entry / "manifest.json").is_file()
    if cache_hit:
        log.info("blueprint %s: cache hit %s", bp.name, entry)
    else:
        started = time.monotonic()
        with building(entry) as scratch:
            _build_into(scratch, bp, cache_dir, kernel=kernel, key=key, versions=versions)
        log.info("blueprint %s: built %s in %.1f s", bp.name, entry, time.monotonic() - started)
    rootfs = entry / "rootfs.ext4"
    if out_dir is not None:
        rootfs = out_dir / "rootfs.ext4"
        _sparse_copy(entry / "rootfs.ext4", rootfs)
    return BuiltImage(blueprint=bp, kernel=kernel.vmlinuz, initramfs=entry / "initramfs.cpio",
                      rootfs=rootfs, manifest=entry / "manifest.json", key=key,
                      cache_hit=cache_hit)


def _build_into(scratch: Path, bp: Blueprint, cache: Path, *, kernel: Kernel, key: str,
                versions: dict[str, str]) -> None:
    busybox_pkg = debian.fetch(BUSYBOX_PACKAGE, cache, version=versions[BUSYBOX_PACKAGE])
    busybox = busybox_pkg.root / "bin" / "busybox"
    env = bp.env_file()
    modules = tuple(dict.fromkeys((*DEFAULT_MODULES, *bp.modules)))

    initrd = initramfs_tree(kernel, busybox, modules=modules, blueprint_env=env)
    write_initramfs(initrd, scratch / "initramfs.cpio", compress=bp.compress_initramfs)

    tree = busybox_tree(busybox)
    tree.symlink("/sbin/init", "/bin/busybox")
    add_guest_files(tree, guest.STAGE2_FILES)
    tree.write("/ferry/blueprint.env", env)
    if bp.agent.enabled:
        tree.copy(AGENT_PATH, agent_build.agent_binary(cache), mode=0o755)
        tree.write(HOOKS_PATH, bp.agent.hooks_conf())
    else:
        tree.write("/ferry/agent/README",
                   b"Put the guest agent here as an executable named 'agent';\n"
                   b"/ferry/start-agent runs it at boot.\n")
    tree.write("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                              b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    tree.write("/etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    tree.write("/etc/hosts", f"127.0.0.1 localhost {bp.name}\n".encode())
    tree.write("/etc/resolv.conf", b"nameserver 10.0.2.3\n")
    packages = add_packages(tree, bp.packages, cache)
    for f in bp.files:
        if f.src.is_dir():
            tree.copy_tree(f.dest, f.src)
        else:
            tree.copy(f.dest, f.src, mode=f.mode)
    write_ext4(tree, scratch / "rootfs.ext4", size_mib=bp.disk_size_mib, scratch=scratch,
               label=bp.name)
    shutil.rmtree(scratch / "rootfs-tree")

    manifest = {
        "format": IMAGE_FORMAT,
        "key": key,
        "blueprint": bp.name,
        "kernel": {"package": kernel.package, "version": kernel.version,
                   "release": kernel.release},
        "packages": {p.name: p.version for p in packages.payload},
        "library_packages": {p.name: p.version for p in packages.library_sources},
        "libraries": list(packages.libraries),
        "busybox": versions[BUSYBOX_PACKAGE],
        "modules": list(modules),
        "initramfs_bytes": (scratch / "initramfs.cpio").stat().st_size,
        "rootfs_bytes": bp.disk_size_mib * 1024 * 1024,
    }
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
