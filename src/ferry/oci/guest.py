"""An OCI image as a ferry guest: kernel, initramfs and the image's root filesystem.

The guest is a small VM around one container:

* the **initramfs stays the root** of the guest. It is the blueprint initramfs (busybox,
  the virtio modules, ferry's stage-1 ``/init`` and stage-2 scripts) plus the guest
  agent, ``/etc/ferry/oci`` (which tells ``/init`` to mount the disk at ``/oci`` instead
  of switching root to it) and ``/ferry/oci-run``, the image's process as a script;
* the **disk is the pulled image** (:mod:`ferry.oci.pull`'s ``rootfs.ext4``, copied
  sparse per VM), untouched: nothing of ferry's lands in the image's tree except the
  mount points and resolv.conf/hosts/hostname files ``oci-run`` binds over, as Docker
  does;
* ``/ferry/oci-run`` is the blueprint workload. It binds ``/dev``, mounts ``/proc`` and
  ``/sys`` under ``/oci``, binds ferry's ``hosts``/``resolv.conf``/``hostname`` over the
  image's, and execs ``/ferry/oci-exec`` (``files/oci-exec.c``, static, compiled and
  cached like the agent), which chroots into ``/oci``, resolves the image's user in the
  image's own ``/etc/passwd`` and ``/etc/group``, changes to the working directory,
  takes that user's groups and ids and execs the argv with exactly the image's environment. Nothing
  runs from the image but its own process, so an image without a shell (distroless)
  runs too. The process's stdout and stderr go to the serial console, which
  ``ferry vm logs`` shows.

The agent, readiness checks and ``ferry vm exec`` run in ferry's root, beside the
container; ``ferry vm exec ID -- chroot /oci CMD`` runs inside it.

Readiness (when the snapshot is taken): ``--readiness CMD``, else the image's first
exposed TCP port being in LISTEN state in ``/proc/net/tcp{,6}`` (busybox's ``nc`` has
no ``-z``, and a connect-and-close would show up in the application's log), else none.

Overrides follow ``docker run``: ``--entrypoint`` replaces the entrypoint and clears the
image's cmd; arguments replace the cmd; ``-e K=V`` adds or replaces a variable (``-e K``
passes nothing: there is no host environment to take it from, so it is refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError
from ferry.guest import files as guest
from ferry.guest.agent.hooks import AGENT_PATH, HOOKS_PATH
from ferry.guest.image import Blueprint, BuiltImage, debian
from ferry.guest.image import agent as agent_build
from ferry.guest.image.blueprint import BUSYBOX_PACKAGE
from ferry.guest.image.cache import building
from ferry.guest.image.errors import ImageError
from ferry.guest.image.initramfs import initramfs_tree, write_initramfs
from ferry.guest.image.kernel import fetch_kernel
from ferry.oci.manifest import ImageConfig
from ferry.oci.pull import PulledImage
from ferry.oci.reference import parse_reference

log = logging.getLogger(__name__)

GUEST_FORMAT = 1
MOUNT_POINT = "/oci"
RUN_SCRIPT = "/ferry/oci-run"
EXEC_PATH = "/ferry/oci-exec"
EXEC_SOURCE = Path(__file__).resolve().parent / "files" / "oci-exec.c"
CC = "gcc"
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s")  # as the agent's
OCI_MARKER = "/etc/ferry/oci"
DEFAULT_MEMORY_MIB = 256
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_RE = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True, slots=True)
class RunOverrides:
    """What ``docker run`` lets a user change: entrypoint, args (the cmd), env."""

    entrypoint: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "K=V"
    readiness: str | None = None
    memory_mib: int = DEFAULT_MEMORY_MIB

    def __post_init__(self) -> None:
        for item in self.env:
            name, sep, _ = item.partition("=")
            if not sep or not _ENV_NAME_RE.match(name):
                raise ConfigError(f"-e {item!r}: give NAME=VALUE")
        if any("\0" in a for a in (*self.args, *self.env, self.entrypoint or "")):
            raise ConfigError("arguments and environment may not contain NUL")


@dataclass(frozen=True, slots=True)
class Process:
    """The image's process after overrides: what ``oci-run`` starts."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    user: str


def process_for(config: ImageConfig, overrides: RunOverrides) -> Process:
    """Apply ``docker run``'s rules to the image config."""
    if overrides.entrypoint is not None:
        entrypoint: tuple[str, ...] = (overrides.entrypoint,) if overrides.entrypoint else ()
        cmd = overrides.args
    else:
        entrypoint, cmd = config.entrypoint, overrides.args or config.cmd
    argv = entrypoint + cmd
    if not argv:
        raise ConfigError("the image has no entrypoint or cmd: give a command")
    env: dict[str, str] = {}
    for item in (*config.env, *overrides.env):
        name, _, value = item.partition("=")
        env[name] = value
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return Process(argv=argv, env=tuple(f"{k}={v}" for k, v in env.items()),
                   workdir=config.workdir or "/", user=config.user)


def readiness_for(config: ImageConfig, overrides: RunOverrides) -> str | None:
    """The readiness command: the override, else a LISTEN check of the first TCP port."""
    if overrides.readiness:
        return overrides.readiness
    tcp = [p.port for p in config.exposed_ports if p.proto == "tcp"]
    if not tcp:
        return None
    # /proc/net/tcp: "sl local_address rem_address st ...", ports in hex, 0A = LISTEN.
    return (f"grep -qE '^ *[0-9]+: [0-9A-F]+:{tcp[0]:04X} [0-9A-F]+:0000 0A ' "
            "/proc/net/tcp /proc/net/tcp6")


def run_script(process: Process) -> bytes:
    """``/ferry/oci-run``: the container's mounts, then ``oci-exec`` starts the process."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# ferry: start the OCI image's process (generated by ferry.oci.guest)",
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        f"R={MOUNT_POINT}",
        "mkdir -p $R/dev $R/proc $R/sys $R/etc",
        "mount --rbind /dev $R/dev",
        "mount -t proc proc $R/proc",
        "mount -t sysfs sysfs $R/sys",
        "hostname > /etc/hostname",
        "for f in hosts resolv.conf hostname; do",
        "    [ -L $R/etc/$f ] && rm -f $R/etc/$f",
        "    [ -e $R/etc/$f ] || : > $R/etc/$f",
        "    mount --bind /etc/$f $R/etc/$f",
        "done",
        f"exec {EXEC_PATH} $R {q(process.user)} {q(process.workdir)} {len(process.env)} "
        + "".join(q(e) + " " for e in process.env) + " ".join(q(a) for a in process.argv),
    ]
    return ("\n".join(lines) + "\n").encode()


def exec_binary(cache_root: Path) -> Path:
    """``oci-exec`` compiled static for the current source (cached by its hash)."""
    digest = hashlib.sha256(EXEC_SOURCE.read_bytes() + "\0".join(CFLAGS).encode()).hexdigest()
    entry = cache_root / "oci" / "exec" / digest[:16]
    binary = entry / "oci-exec"
    if binary.is_file():
        return binary
    with building(entry) as scratch:
        try:
            proc = subprocess.run([CC, *CFLAGS, "-o", str(scratch / "oci-exec"),
                                   str(EXEC_SOURCE)], capture_output=True, text=True,
                                  check=False)
        except OSError as exc:
            raise ImageError(f"cannot run {CC} for oci-exec: {exc}") from exc
        if proc.returncode != 0:
            raise ImageError(f"compiling oci-exec failed ({proc.returncode}): "
                             f"{' '.join(proc.stderr.split())}")
    return binary


def guest_name(repository: str) -> str:
    """A blueprint name from ``REPO``'s last component ([a-z0-9-], at most 63)."""
    name = _NAME_RE.sub("-", repository.rsplit("/", 1)[-1].lower()).strip("-")[:63]
    return name.strip("-") or "oci"


def _key(pulled: PulledImage, bp: Blueprint, script: bytes, kernel_id: str,
         busybox: str) -> str:
    h = hashlib.sha256()
    for label, data in (
            ("format", str(GUEST_FORMAT).encode()), ("image", pulled.digest.encode()),
            ("kernel", kernel_id.encode()), ("busybox", busybox.encode()),
            ("env", bp.env_file()), ("run", script),
            ("agent", agent_build.agent_source_digest().encode()),
            ("exec", EXEC_SOURCE.read_bytes()),
            *((f"guest:{p.name}", p.read_bytes())
              for p in sorted(guest.GUEST_FILES_DIR.iterdir()) if p.is_file())):
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def guest_blueprint(pulled: PulledImage, overrides: RunOverrides) -> Blueprint:
    """The blueprint an image's guest boots with: its name, memory, workload, readiness."""
    return Blueprint(name=guest_name(parse_reference(pulled.reference).repository),
                     memory_mib=overrides.memory_mib, workload=f"exec {RUN_SCRIPT}",
                     readiness=readiness_for(pulled.config, overrides))


def guest_image(pulled: PulledImage, overrides: RunOverrides, *, cache_dir: Path,
                disk_dir: Path | None = None) -> BuiltImage:
    """The guest of ``pulled`` with ``overrides``: kernel, initramfs (cached) and disk.

    With ``disk_dir`` the image's root filesystem is copied there (sparse), so the guest
    can write to it; without, ``rootfs`` is the read-only cache entry.
    """
    process = process_for(pulled.config, overrides)
    bp = guest_blueprint(pulled, overrides)
    name = bp.name
    script = run_script(process)
    kernel = fetch_kernel(cache_dir)
    busybox_version = debian.candidate_version(BUSYBOX_PACKAGE)
    key = _key(pulled, bp, script, f"{kernel.package}={kernel.version}", busybox_version)
    entry = cache_dir / "oci" / "guests" / f"{name}-{key[:16]}"
    cache_hit = (entry / "manifest.json").is_file()
    if not cache_hit:
        with building(entry) as scratch:
            busybox = debian.fetch(BUSYBOX_PACKAGE, cache_dir, version=busybox_version)
            tree = initramfs_tree(kernel, busybox.root / "bin" / "busybox",
                                  blueprint_env=bp.env_file())
            tree.copy(AGENT_PATH, agent_build.agent_binary(cache_dir), mode=0o755)
            tree.write(HOOKS_PATH, bp.agent.hooks_conf())
            tree.write(OCI_MARKER, pulled.digest.encode() + b"\n")
            tree.write(RUN_SCRIPT, script, mode=0o755)
            tree.copy(EXEC_PATH, exec_binary(cache_dir), mode=0o755)
            tree.write("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
            tree.write("/etc/group", b"root:x:0:\n")
            tree.write("/etc/hosts", f"127.0.0.1 localhost {name}\n".encode())
            tree.write("/etc/resolv.conf", b"nameserver 10.0.2.3\n")
            write_initramfs(tree, scratch / "initramfs.cpio", compress=True)
            manifest = {"format": GUEST_FORMAT, "key": key, "image": pulled.digest,
                        "reference": pulled.reference, "name": name,
                        "kernel": {"package": kernel.package, "version": kernel.version},
                        "busybox": busybox_version, "argv": list(process.argv),
                        "env": list(process.env), "workdir": process.workdir,
                        "user": process.user, "readiness": bp.readiness}
            (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        log.info("OCI guest %s: built %s", name, entry)
    rootfs = pulled.rootfs
    if disk_dir is not None:
        rootfs = disk_dir / "rootfs.ext4"
        disk_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(pulled.rootfs),
                               str(rootfs)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ImageError(f"copying {pulled.rootfs} failed: {proc.stderr.strip()}")
    return BuiltImage(blueprint=bp, kernel=kernel.vmlinuz, initramfs=entry / "initramfs.cpio",
                      rootfs=rootfs, manifest=entry / "manifest.json", key=key,
                      cache_hit=cache_hit)
