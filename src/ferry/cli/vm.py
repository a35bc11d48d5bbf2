"""``ferry vm ...``, ``ferry key ...``, ``ferry package ...``: argument parsing around
:mod:`ferry.vm`, :mod:`ferry.package.commands` and :mod:`ferry.s3.packages` (see docs/vm.md)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ferry.cli import interactive
from ferry.cli.args import add_accel, positive_float, positive_int
from ferry.cli.exitcodes import ExitCode
from ferry.cli.output import emit_json
from ferry.errors import ConfigError
from ferry.guest.image import build_blueprint
from ferry.live.launch import IDLE_TIMEOUT_S
from ferry.migration.autocompress import LinkCompression
from ferry.node import listing
from ferry.node.control import ControlClient
from ferry.oci import PullOptions, PullPolicy, pull
from ferry.oci.guest import DEFAULT_MEMORY_MIB, RunOverrides
from ferry.oci.packages import (
    DEFAULT_MAX_PACKAGE_BYTES,
    default_destination,
    pull_package,
    push_package,
)
from ferry.oci.pull import DEFAULT_MAX_LAYER_BYTES
from ferry.package import PackageInfo, Progress, TrustStore
from ferry.package import commands as pkg
from ferry.s3 import S3URL, S3Config
from ferry.s3.mirror import DEFAULT_INTERVAL_S, check_prefix_free
from ferry.s3.vmcheckpoint import load_record
from ferry.shape import DEFAULT_CPU_MODEL, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB
from ferry.vm import labels, pkgcache, registry, userdata, volumes
from ferry.vm.errors import VMNotFoundError
from ferry.vm.publish import parse_publish
from ferry.vm.stopmode import StopMode

if TYPE_CHECKING:
    from ferry.node import supervisor

# Modules that run VMs (QEMU, FUSE, live migration, boto3's S3 transfers, OCI builds) are
# imported by the commands that use them: the rest (ls, exec, stop, migrate) start faster.

AddCommon = Callable[[argparse.ArgumentParser], None]


def add_parsers(sub: Any, add_common: AddCommon) -> None:
    """Add the ``vm``, ``key`` and ``package`` command groups to ``sub``."""
    p = sub.add_parser("vm", help="build, snapshot, run and control VMs")
    vm = p.add_subparsers(dest="vm_command", required=True)

    c = vm.add_parser("build", help="build a blueprint's kernel, initramfs and root disk")
    c.add_argument("blueprint", help="shipped name (minimal, redis) or a .toml file")
    add_common(c)

    c = vm.add_parser("snapshot", help="boot a blueprint (or an OCI image) until ready and "
                                       "snapshot it")
    c.add_argument("blueprint", help="shipped name, a .toml file, or oci://REGISTRY/REPO:TAG")
    _add_oci_options(c)
    c.add_argument("-o", "--out", type=Path, required=True, help="package directory to write")
    c.add_argument("--prepare", action="append", default=[], metavar="CMD",
                   help="shell command to run in the guest before the snapshot (repeatable)")
    c.add_argument("--cpu-model", default=DEFAULT_CPU_MODEL)
    c.add_argument("--memory-mib", type=int, metavar="MIB",
                   help="guest RAM, overriding the blueprint's memory_mib "
                        f"({MIN_MEMORY_MIB}..{MAX_MEMORY_MIB})")
    c.add_argument("--cpus", type=int, metavar="N",
                   help=f"virtual CPUs, overriding the blueprint's vcpus (1..{MAX_VCPUS})")
    c.add_argument("--disk", action="append", default=[], metavar="NAME:MIB",
                   help="an empty data disk besides the root disk (repeatable; the guest's "
                        "/dev/vdb, /dev/vdc, ... in order)")
    c.add_argument("--package", type=Path, metavar="FILE", help="also sign it into FILE")
    c.add_argument("--key", type=Path, help="signing key (default: ferry's default key)")
    add_accel(c)
    add_common(c)

    c = vm.add_parser("run", help="resume a package or an OCI image's VM (or continue a "
                                  "suspended VM): ferry vm run [OPTIONS] oci://REF [-- ARGS]")
    c.add_argument("package", nargs="?",
                   help="package file, or oci://REGISTRY/REPO:TAG; omit to continue the "
                        "suspended VM --name")
    _add_oci_options(c)
    c.add_argument("--memory-mib", type=int, metavar="MIB",
                   help=f"guest RAM of an OCI image's VM (default {DEFAULT_MEMORY_MIB})")
    c.add_argument("--name", help="VM id ([a-z0-9-], default: vm-<random>)")
    c.add_argument("-l", "--label", action="append", default=None, metavar="KEY=VALUE",
                   help="a label (repeatable); a continued VM keeps its own without one")
    c.add_argument("-p", "--publish", action="append", default=[], metavar="SPEC",
                   help="[HOST:]HOST_PORT:GUEST_PORT[/tcp|/udp] (repeatable)")
    c.add_argument("--allow-wildcard", action="store_true",
                   help="allow publishing on 0.0.0.0 / ::")
    c.add_argument("--service-address", metavar="IPV4",
                   help="an address of the hosts' network that follows the VM when it "
                        "migrates, serving the -p guest ports; clients connected to it "
                        "keep their connections across migrations (docs/networking.md)")
    c.add_argument("--user-data", type=Path, metavar="FILE",
                   help="a '#!' script or '#cloud-config' (write_files, runcmd) run once "
                        f"in the guest after the resume, at most "
                        f"{userdata.MAX_USER_DATA_BYTES // 1024} KiB; output in 'vm logs'")
    c.add_argument("--volume", action="append", default=[], metavar="NAME[:DISK]",
                   help="attach the volume NAME in place of the package's extra disk DISK "
                        "(default: the next one); see 'ferry volume'")
    c.add_argument("--user-data-timeout", type=positive_float, metavar="S",
                   default=userdata.DEFAULT_USER_DATA_TIMEOUT_S,
                   help="kill the user data after S seconds (default: %(default)s)")
    c.add_argument("-d", "--detach", action="store_true", help="run in the background")
    c.add_argument("--trust", type=Path, help="trust list (default: this host's)")
    c.add_argument("--mirror", metavar="s3://BUCKET/PREFIX",
                   help="mirror the running VM to this bucket prefix: a consistent "
                        "checkpoint every --mirror-interval, restorable anywhere with "
                        "'ferry vm restore' (docs/s3.md)")
    c.add_argument("--mirror-interval", type=positive_float, default=DEFAULT_INTERVAL_S,
                   metavar="S", help=f"seconds between checkpoints (default "
                                     f"{DEFAULT_INTERVAL_S:g})")
    _s3_options(c)
    add_accel(c)
    add_common(c)

    c = vm.add_parser("restore", help="resume a mirrored VM from the last complete "
                                      "checkpoint in its bucket (crash recovery)")
    c.add_argument("url", metavar="s3://BUCKET/PREFIX")
    c.add_argument("--name", help="VM id here (default: the mirrored VM's)")
    c.add_argument("-p", "--publish", action="append", default=[], metavar="SPEC",
                   help="[HOST:]HOST_PORT:GUEST_PORT[/tcp|/udp] (repeatable)")
    c.add_argument("--allow-wildcard", action="store_true",
                   help="allow publishing on 0.0.0.0 / ::")
    c.add_argument("-d", "--detach", action="store_true", help="run in the background")
    c.add_argument("--mirror", metavar="s3://BUCKET/PREFIX",
                   help="mirror the restored VM to this (other) prefix")
    c.add_argument("--mirror-interval", type=positive_float, default=DEFAULT_INTERVAL_S,
                   metavar="S")
    _s3_options(c)
    add_accel(c)
    add_common(c)

    c = vm.add_parser("list", aliases=["ls"], help="running and suspended VMs")
    c.add_argument("--filter", action="append", default=[], metavar="label=KEY[=VALUE]",
                   help="only VMs with this label (repeatable: all must match)")
    add_common(c)

    c = vm.add_parser("inspect", help="one VM in detail, as JSON")
    c.add_argument("vm_id")
    add_common(c)

    c = vm.add_parser("stats", help="CPU, memory and guest-RAM I/O of running VMs")
    c.add_argument("vm_ids", nargs="*", metavar="ID", help="these VMs (default: all running)")
    c.add_argument("--no-stream", action="store_true",
                   help="print once (default: every second until Ctrl-C; --json implies it)")
    add_common(c)

    c = vm.add_parser("rm", help="remove a suspended VM (-f: also stop a running one)")
    c.add_argument("vm_id")
    c.add_argument("-f", "--force", action="store_true", help="stop it first if it runs")
    add_common(c)

    c = vm.add_parser("logs", help="a VM's serial console (-f: follow it)")
    c.add_argument("vm_id")
    c.add_argument("-f", "--follow", action="store_true", help="keep printing what comes")
    add_common(c)

    c = vm.add_parser("exec", help="run a command in a VM: ferry vm exec [OPTIONS] ID -- CMD...")
    c.add_argument("vm_id")
    c.add_argument("argv", nargs="*", metavar="CMD",
                   help="the command; put it after '--' when it has options of its own")
    c.add_argument("--timeout", type=positive_float, default=None,
                   help="seconds the command may run (default: 30; not with -i/-t)")
    c.set_defaults(takes_rest=True)
    c.add_argument("-i", "--stdin", "--interactive", dest="stdin", action="store_true",
                   help="stream stdin to the command (it ends the command's stdin at EOF)")
    c.add_argument("-t", "--tty", action="store_true",
                   help="run the command on a pty in the guest; with a terminal on stdin, "
                        "it is put in raw mode and its size follows")
    add_common(c)

    c = vm.add_parser("attach", help="the VM's serial console, interactive (detach: Ctrl-])")
    c.add_argument("vm_id")
    add_common(c)

    c = vm.add_parser("stop", help="stop a VM (discard it, or --suspend it)")
    c.add_argument("vm_id")
    c.add_argument("--suspend", action="store_true",
                   help="keep it: the next 'ferry vm run --name ID' continues it")
    add_common(c)

    _add_migration_parsers(vm, add_common)

    p = sub.add_parser("volume", help="disks that outlive a VM (vm run --volume)")
    vol = p.add_subparsers(dest="volume_command", required=True)
    c = vol.add_parser("create", help="create an empty volume")
    c.add_argument("name")
    c.add_argument("--size", type=positive_int, required=True, metavar="MIB",
                   help="its size; equal to the package disk it replaces")
    add_common(c)
    c = vol.add_parser("list", aliases=["ls"], help="this host's volumes")
    add_common(c)
    c = vol.add_parser("rm", help="delete a volume (not while a VM holds it)")
    c.add_argument("name")
    add_common(c)

    p = sub.add_parser("key", help="package signing keys and this host's trust list")
    key = p.add_subparsers(dest="key_command", required=True)
    c = key.add_parser("create", help="create an ed25519 signing key")
    c.add_argument("path", type=Path, nargs="?")
    c.add_argument("--comment")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--trust", action="store_true", help="also trust it on this host")
    c.add_argument("--trust-path", type=Path)
    add_common(c)
    c = key.add_parser("trust", help="trust a public key (.pub) on this host")
    c.add_argument("pubkey", type=Path)
    c.add_argument("--trust-path", type=Path)
    add_common(c)

    p = sub.add_parser("package", help="sign, verify and extract VM packages")
    pk = p.add_subparsers(dest="package_command", required=True)
    c = pk.add_parser("list", aliases=["ls"], help="this host's package cache")
    add_common(c)
    c = pk.add_parser("rm", help="remove a package from this host's cache (not while a VM "
                                 "uses it)")
    c.add_argument("package_id", help="its id, or the first 8+ hex digits of it")
    add_common(c)
    c = pk.add_parser("prune", help="remove every cached package no VM here uses")
    add_common(c)
    c = pk.add_parser("create", help="sign a package directory into one file")
    c.add_argument("dir", type=Path)
    c.add_argument("file", type=Path)
    c.add_argument("--key", type=Path)
    c.add_argument("--overwrite", action="store_true")
    add_common(c)
    c = pk.add_parser("verify", help="verify a package against the trust list")
    c.add_argument("file", type=Path)
    c.add_argument("--trust", type=Path)
    add_common(c)
    c = pk.add_parser("extract", help="verify and extract a package")
    c.add_argument("file", type=Path)
    c.add_argument("dir", type=Path)
    c.add_argument("--trust", type=Path)
    c.add_argument("--overwrite", action="store_true")
    add_common(c)
    c = pk.add_parser("add", help="verify a package into this host's package cache: VMs of "
                                  "it then arrive here with only the blocks they changed")
    c.add_argument("file", type=Path)
    c.add_argument("--trust", type=Path)
    add_common(c)
    c = pk.add_parser("push", help="upload a package to S3 (s3://BUCKET/KEY) or an OCI "
                                   "registry (oci://REGISTRY/REPO:TAG)")
    c.add_argument("file", type=Path)
    c.add_argument("url", metavar="s3://BUCKET/KEY|oci://REGISTRY/REPO:TAG")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--trust", type=Path,
                   help="oci://: the trust list the package must verify against first")
    _s3_options(c)
    _registry_options(c)
    add_common(c)
    c = pk.add_parser("pull", help="download a package from S3 or an OCI registry and verify "
                                   "it before it lands at DEST")
    c.add_argument("url", metavar="s3://BUCKET/KEY|oci://REF")
    c.add_argument("dest", type=Path, nargs="?",
                   help="file or directory (default: the key's or repository's file name, "
                        "here)")
    c.add_argument("--trust", type=Path)
    c.add_argument("--overwrite", action="store_true")
    _s3_options(c)
    _registry_options(c)
    add_common(c)


def _registry_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--insecure", dest="tls_verify", action="store_false", default=None,
                   help="oci://: allow plain HTTP to a registry that is not on loopback")


def _s3_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3, "
                                          "AWS_ENDPOINT_URL, ~/.aws/config, else AWS)")
    c.add_argument("--region", help="default: AWS_DEFAULT_REGION or the profile's")
    c.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")


def _s3_config(args: argparse.Namespace) -> S3Config:
    return S3Config(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)


def _add_oci_options(c: argparse.ArgumentParser) -> None:
    """``docker run``'s overrides, for an ``oci://`` image (docs/oci.md)."""
    g = c.add_argument_group("OCI images (oci://REF; arguments after '--' replace the cmd)")
    g.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set a variable (repeatable): in an image's process; for a package, "
                        "in every command the guest agent starts and /run/ferry/env")
    g.add_argument("--env-file", action="append", default=[], type=Path, metavar="FILE",
                   help="variables from FILE, NAME=VALUE per line (before -e)")
    g.add_argument("--entrypoint", help="replace the image's entrypoint (and clear its cmd)")
    g.add_argument("--readiness", metavar="CMD",
                   help="snapshot once CMD exits 0 in the guest (default: the first exposed "
                        "TCP port listens)")
    g.add_argument("--max-layer-mib", type=positive_int,
                   default=DEFAULT_MAX_LAYER_BYTES // 2**20, help=argparse.SUPPRESS)
    g.add_argument("--insecure", dest="tls_verify", action="store_false", default=None,
                   help="allow plain HTTP to a registry that is not on loopback")
    g.add_argument("--pull", choices=[p.value for p in PullPolicy], default="missing",
                   help="ask the registry what the tag names: 'missing' (default) only if "
                        "this host never pulled it, 'always' every time")
    c.set_defaults(takes_rest=True)


def _env_files(args: argparse.Namespace) -> list[str]:
    texts = []
    for path in args.env_file:
        try:
            if path.stat().st_size > userdata.MAX_ENV_BYTES * 2:
                raise ConfigError(f"--env-file {path}: larger than "
                                  f"{userdata.MAX_ENV_BYTES * 2} bytes")
            texts.append(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--env-file {path}: {exc}") from exc
    return texts


def _oci_overrides(args: argparse.Namespace, memory_mib: int | None) -> RunOverrides:
    env = userdata.parse_env(args.env, _env_files(args), check=False)
    return RunOverrides(entrypoint=args.entrypoint, args=tuple(args.rest),
                        env=tuple(f"{k}={v}" for k, v in env.items()),
                        readiness=args.readiness,
                        memory_mib=memory_mib or DEFAULT_MEMORY_MIB)


def _refuse_oci_options(args: argparse.Namespace, what: str) -> None:
    if args.rest or args.entrypoint or args.readiness:
        raise ConfigError(f"--entrypoint, --readiness and arguments after '--' are for "
                          f"oci:// images, not {what}")


def _user_data(args: argparse.Namespace) -> str | None:
    path: Path | None = args.user_data
    if path is None:
        return None
    try:
        if path.stat().st_size > userdata.MAX_USER_DATA_BYTES:
            raise ConfigError(f"--user-data {path}: larger than "
                              f"{userdata.MAX_USER_DATA_BYTES} bytes")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--user-data {path}: {exc}") from exc
    userdata.parse_user_data(text)  # refused here, before anything starts
    return text


class _Out:
    """What every handler prints with: JSON (``--json``) or the human line, and progress."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console

    def __call__(self, data: Any, human: Callable[[], None]) -> None:
        if self.args.json:
            emit_json(data)
        else:
            human()

    def progress(self, line: str) -> None:
        if not self.args.no_progress:
            self.console.print(f"[dim]…[/dim] {escape(line)}")


Handler = Callable[[argparse.Namespace, _Out], Awaitable[int | None]]
LOG_FOLLOW_S = 0.2
EXEC_TIMEOUT_S = 30.0
"""How often ``vm logs -f`` looks for more console output."""


async def run(args: argparse.Namespace, console: Console) -> int:
    """Run the ``vm``/``key``/``package`` command ``args`` names (see :data:`_HANDLERS`)."""
    handler = _HANDLERS.get((args.command, getattr(args, f"{args.command}_command")))
    if handler is None:
        raise ConfigError(f"unknown command {args.command}")
    code = await handler(args, _Out(args, console))
    return ExitCode.OK if code is None else code


async def _vm_build(args: argparse.Namespace, out: _Out) -> None:
    img = build_blueprint(args.blueprint, cache_dir=args.host.cache_root)
    data = {"blueprint": img.blueprint.name, "kernel": img.kernel,
            "initramfs": img.initramfs, "rootfs": img.rootfs, "key": img.key,
            "cache_hit": img.cache_hit}
    out(data, lambda: out.console.print(
        f"built {img.blueprint.name}{' (cached)' if img.cache_hit else ''}: "
        f"{img.kernel}, {img.initramfs}, {img.rootfs}"))


async def _vm_snapshot(args: argparse.Namespace, out: _Out) -> None:
    from ferry.vm import snapshot
    from ferry.vm.oci import is_oci, snapshot_image

    if is_oci(args.blueprint) and (args.cpus is not None or args.disk):
        raise ConfigError("--cpus and --disk are for blueprints (not yet for OCI images)")
    extra_disks = []
    for spec in args.disk:
        name, sep, mib = spec.partition(":")
        if not sep or not mib.isdigit():
            raise ConfigError(f"--disk {spec!r}: give NAME:MIB, e.g. data:1024")
        extra_disks.append((name, int(mib)))
    if is_oci(args.blueprint):
        image = await pull(args.blueprint, cache_dir=args.host.cache_root,
                           options=PullOptions(max_layer_bytes=args.max_layer_mib * 2**20,
                                               tls_verify=args.tls_verify,
                                               policy=PullPolicy(args.pull)))
        report = await snapshot_image(image, _oci_overrides(args, args.memory_mib), args.out,
                                      host=args.host, cpu_model=args.cpu_model,
                                      progress=out.progress, prepare=args.prepare)
    else:
        _refuse_oci_options(args, "blueprints")
        report = await snapshot.snapshot(
            args.blueprint, args.out, prepare=args.prepare, cpu_model=args.cpu_model,
            memory_mib=args.memory_mib, vcpus=args.cpus, extra_disks=extra_disks,
            host=args.host, progress=out.progress)
    data = {"package_dir": report.package_dir, "build_s": report.build_s,
            "boot_to_agent_s": report.boot_to_agent_s, "ready_s": report.ready_s,
            "state_bytes": report.device_state.state_bytes, "total_s": report.total_s}
    if args.package:
        info = pkg.package_create(args.out, args.package,
                                  key_path=args.key or args.host.signing_key,
                                  progress=_package_progress(out.progress))
        data["package"] = _package_json(info)
    out(data, lambda: out.console.print(
        f"snapshot of {report.manifest.name} in {report.package_dir} (ready after "
        f"{report.ready_s:.1f} s, device state {report.device_state.state_bytes} B)"
        + (f", signed into {args.package}" if args.package else "")))


async def _vm_run_command(args: argparse.Namespace, out: _Out) -> int:
    return await _vm_run(args, out.console, out.progress, out)


async def _vm_migration(args: argparse.Namespace, out: _Out) -> int:
    from ferry.cli import vm_migrate

    return await vm_migrate.run(args, out.console, out, out.progress)


async def _vm_list(args: argparse.Namespace, out: _Out) -> None:
    selectors = []
    for f in args.filter:
        kind, sep, selector = f.partition("=")
        if kind != "label" or not sep or not selector:
            raise ConfigError(f"--filter {f!r}: use label=KEY or label=KEY=VALUE")
        selectors.append(selector)
    views = [v for v in listing.vm_views(registry.VMPaths.of(args.host))
             if all(labels.matches(v.get("labels") or {}, s) for s in selectors)]
    out(views, lambda: _print_vms(out.console, views))


async def _vm_inspect(args: argparse.Namespace, out: _Out) -> None:
    detail = await listing.inspect(registry.VMPaths.of(args.host), args.vm_id)
    if detail is None:
        raise VMNotFoundError("no such VM here (see 'ferry vm list')", vm=args.vm_id)
    emit_json(detail)


STATS_EVERY_S = 1.0


async def _vm_stats(args: argparse.Namespace, out: _Out) -> None:
    paths = registry.VMPaths.of(args.host)
    for vm_id in args.vm_ids:
        registry.check_vm_id(vm_id)

    async def sample() -> dict[str, dict[str, Any]]:
        views = await asyncio.to_thread(listing.vm_views, paths)
        wanted = [v["vm_id"] for v in views if v["status"] not in ("suspended", "waiting")
                  and (not args.vm_ids or v["vm_id"] in args.vm_ids)]
        missing = set(args.vm_ids) - set(wanted)
        if missing:
            raise VMNotFoundError("is not running here (see 'ferry vm list')",
                                  vm=sorted(missing)[0])
        found = await asyncio.gather(*(listing.inspect(paths, v) for v in wanted))
        return {d["vm_id"]: {**d, "at": time.monotonic()} for d in found if d is not None}

    before = await sample()
    while True:
        await asyncio.sleep(STATS_EVERY_S)
        now = await sample()
        rows = [vm_stats(now[v], before.get(v)) for v in now]
        before = now
        if args.json or args.no_stream:
            out(rows, functools.partial(_print_stats, out.console, rows))
            return
        out.console.clear()
        _print_stats(out.console, rows)


def vm_stats(now: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """One VM's figures from two :func:`listing.inspect` samples: QEMU's CPU use in
    percent of one core, guest RAM, guest-RAM reads through FUSE per second, uptime."""
    cpu = rate = None
    if before is not None and now["at"] > before["at"]:
        dt = now["at"] - before["at"]
        c0, c1 = before["qemu_usage"].get("cpu_s"), now["qemu_usage"].get("cpu_s")
        if c0 is not None and c1 is not None:
            cpu = round(100 * max(0.0, c1 - c0) / dt, 1)
        b0, b1 = before["memory_io"].get("bytes_read"), now["memory_io"].get("bytes_read")
        if b0 is not None and b1 is not None:
            rate = round(max(0, b1 - b0) / dt)
    started = now.get("started_at")
    return {"vm_id": now["vm_id"], "status": now["status"], "cpu_percent": cpu,
            "memory_bytes": now.get("memory_bytes"),
            "ram_fuse_read_bytes_per_s": rate,
            "uptime_s": round(time.time() - started, 1) if started else None,
            "migration": now.get("migration")}


def _print_stats(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table()
    for col in ("id", "status", "cpu %", "memory", "RAM via FUSE", "uptime", "migration"):
        table.add_column(col)
    for r in rows:
        mig = r["migration"]
        table.add_row(
            r["vm_id"], r["status"], "" if r["cpu_percent"] is None else f"{r['cpu_percent']}",
            "" if not r["memory_bytes"] else f"{r['memory_bytes'] >> 20} MiB",
            "" if r["ram_fuse_read_bytes_per_s"] is None
            else f"{r['ram_fuse_read_bytes_per_s'] / 1e6:.1f} MB/s",
            "" if r["uptime_s"] is None else f"{r['uptime_s']:.0f} s",
            "" if not mig else f"{mig.get('phase')} {mig.get('bytes_sent', 0) / 1e6:.1f} MB")
    console.print(table)


async def _vm_logs(args: argparse.Namespace, out: _Out) -> None:
    paths = registry.VMPaths.of(args.host)
    log = listing.console_log(paths, registry.check_vm_id(args.vm_id))
    if log is None:
        raise VMNotFoundError("runs nowhere on this host (see 'ferry vm list')", vm=args.vm_id)
    boot = await asyncio.to_thread(listing.boot_console, paths, args.vm_id)
    if boot is not None:  # an OCI image's VM: what its process printed before the snapshot
        data, _ = await asyncio.to_thread(listing.read_log, boot)
        sys.stdout.buffer.write(data)
    offset = 0
    while True:
        data, offset = await asyncio.to_thread(listing.read_log, log, offset=offset)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        if not args.follow or registry.live_supervisor(paths, args.vm_id) is None:
            return
        await asyncio.sleep(LOG_FOLLOW_S)


async def _vm_exec(args: argparse.Namespace, out: _Out) -> int:
    argv = [*args.argv, *args.rest]
    if not argv:
        raise ConfigError("no command given: ferry vm exec ID -- CMD...")
    if args.stdin or args.tty:
        if args.json or args.timeout is not None:
            raise ConfigError("--json and --timeout are for a one-shot exec, not with -i/-t")
        return await interactive.exec_session(_client(args), argv, stdin=args.stdin,
                                              tty=args.tty)
    reply = await _client(args).exec(argv, timeout_s=args.timeout or EXEC_TIMEOUT_S)
    if args.json:
        emit_json({"exit_code": reply.exit_code,
                   "stdout": reply.stdout.decode(errors="replace"),
                   "stderr": reply.stderr.decode(errors="replace")})
    else:
        sys.stdout.buffer.write(reply.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(reply.stderr)
        sys.stderr.flush()
    return reply.exit_code


async def _vm_attach(args: argparse.Namespace, out: _Out) -> int:
    if args.json:
        raise ConfigError("attach is interactive: no --json")
    return await interactive.attach(_client(args), args.vm_id)


async def _vm_stop(args: argparse.Namespace, out: _Out) -> None:
    stopped = await _client(args).stop(StopMode.SUSPEND if args.suspend else StopMode.DISCARD)
    data = {"mode": stopped.mode.value, "state_bytes": stopped.state_bytes,
            "flush_bytes": stopped.flush_bytes}
    out(data, lambda: out.console.print(f"{args.vm_id}: stopped ({stopped.mode.value})"))


async def _vm_rm(args: argparse.Namespace, out: _Out) -> None:
    vm_id = args.vm_id
    removed = await listing.remove(registry.VMPaths.of(args.host), vm_id, force=args.force)
    out({"vm_id": vm_id, "removed": removed},
        lambda: out.console.print(f"{vm_id}: {removed}"))


async def _volume_create(args: argparse.Namespace, out: _Out) -> None:
    vol = await asyncio.to_thread(volumes.create_volume, args.host.state_root, args.name,
                                  args.size)
    out(vol.to_json(), lambda: out.console.print(f"{vol.name}: {args.size} MiB"))


async def _volume_list(args: argparse.Namespace, out: _Out) -> None:
    found = await asyncio.to_thread(volumes.list_volumes, args.host.state_root)

    def show() -> None:
        table = Table()
        for col in ("name", "size", "in use"):
            table.add_column(col)
        for v in found:
            table.add_row(v.name, f"{v.size_bytes // 2**20} MiB", "yes" if v.in_use else "")
        out.console.print(table)
    out([v.to_json() for v in found], show)


async def _volume_rm(args: argparse.Namespace, out: _Out) -> None:
    await asyncio.to_thread(volumes.remove_volume, args.host.state_root, args.name)
    out({"name": args.name, "removed": True},
        lambda: out.console.print(f"{args.name}: removed"))


async def _key_create(args: argparse.Namespace, out: _Out) -> None:
    info = pkg.key_create(args.path, host=args.host, comment=args.comment,
                          overwrite=args.overwrite, trust=args.trust,
                          trust_path=args.trust_path)
    out({"key_id": info.key_id, "private_key": info.private_key_path,
         "public_key": info.public_key_path},
        lambda: out.console.print(f"key {info.key_id}: {info.private_key_path} "
                                  f"(+ .pub){', trusted' if args.trust else ''}"))


async def _key_trust(args: argparse.Namespace, out: _Out) -> None:
    pub = pkg.key_trust(args.pubkey, host=args.host, trust_path=args.trust_path)
    out({"key_id": pub.key_id}, lambda: out.console.print(f"trusted key {pub.key_id}"))


async def _package_create(args: argparse.Namespace, out: _Out) -> None:
    info = pkg.package_create(args.dir, args.file, key_path=args.key or args.host.signing_key,
                              overwrite=args.overwrite,
                              progress=_package_progress(out.progress))
    out(_package_json(info), lambda: out.console.print(
        f"{args.file}: {len(info.files)} files, signed by {info.key_id}"))


async def _package_verify(args: argparse.Namespace, out: _Out) -> None:
    info = pkg.package_verify(args.file, host=args.host, trust_path=args.trust,
                              progress=_package_progress(out.progress))
    out(_package_json(info), lambda: out.console.print(
        f"{args.file}: OK, {len(info.files)} files, signed by {info.key_id}"))


async def _package_extract(args: argparse.Namespace, out: _Out) -> None:
    info = pkg.package_extract(args.file, args.dir, host=args.host, trust_path=args.trust,
                               overwrite=args.overwrite,
                               progress=_package_progress(out.progress))
    out(_package_json(info), lambda: out.console.print(
        f"{args.file}: verified, extracted into {args.dir}"))


def _trust_of(args: argparse.Namespace) -> TrustStore:
    return TrustStore.from_path(args.trust) if args.trust else TrustStore.for_host(args.host)


async def _package_push_oci(args: argparse.Namespace, out: _Out) -> None:
    pushed = await push_package(args.file, args.url, _trust_of(args),
                                options=PullOptions(tls_verify=args.tls_verify),
                                overwrite=args.overwrite)
    out({"reference": pushed.reference, "key_id": pushed.key_id},
        lambda: out.console.print(f"{args.file}: pushed to {pushed.reference} "
                                  f"(signed by {pushed.key_id})"))


async def _package_pull_oci(args: argparse.Namespace, out: _Out) -> None:
    dest = args.dest if args.dest is not None else default_destination(args.url)
    if await asyncio.to_thread(dest.is_dir):  # a directory: the default name inside it
        dest = dest / default_destination(args.url)
    pulled = await pull_package(
        args.url, dest, _trust_of(args), overwrite=args.overwrite,
        options=PullOptions(max_layer_bytes=DEFAULT_MAX_PACKAGE_BYTES,
                            tls_verify=args.tls_verify))
    data = {**_package_json(pulled.info), "reference": pulled.reference,
            "digest": pulled.digest}
    out(data, lambda: out.console.print(
        f"{pulled.reference}: verified, {len(pulled.info.files)} files signed by "
        f"{pulled.info.key_id}, in {pulled.path}"))


async def _package_add(args: argparse.Namespace, out: _Out) -> None:
    if not args.file.is_file():
        raise ConfigError(f"no package file {args.file}")
    host = args.host
    trust = TrustStore.from_path(args.trust) if args.trust else TrustStore.for_host(host)
    opened = await asyncio.to_thread(pkgcache.open_package, args.file, trust,
                                     cache_dir=host.package_cache,
                                     progress=_package_progress(out.progress))
    data = {"file": str(args.file), "package_id": opened.package_id,
            "directory": str(opened.directory), "already_cached": opened.cache_hit}
    out(data, lambda: out.console.print(
        f"{args.file}: verified, in this host's package cache as {opened.package_id[:12]}"
        + (" (already there)" if opened.cache_hit else "")))


def _in_use(host: Any) -> set[Path]:
    """Cache entries a VM of this host runs on or is suspended on."""
    return {Path(v.package) for v in registry.list_vms(registry.VMPaths.of(host)) if v.package}


async def _package_list(args: argparse.Namespace, out: _Out) -> None:
    in_use = _in_use(args.host)
    rows: list[dict[str, Any]] = [{"package_id": p.package_id, "name": p.manifest.name,
             "directory": str(p.directory), "size_bytes": pkgcache.entry_bytes(p),
             "in_use": p.directory in in_use}
            for p in pkgcache.cached_packages(args.host.package_cache)]

    def show() -> None:
        table = Table()
        for col in ("id", "name", "size", "in use"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["package_id"][:12], r["name"], f"{r['size_bytes'] >> 20} MiB",
                          "yes" if r["in_use"] else "")
        out.console.print(table)

    out(rows, show)


async def _package_rm(args: argparse.Namespace, out: _Out) -> None:
    want = args.package_id.lower()
    if not (8 <= len(want) <= 64) or any(c not in "0123456789abcdef" for c in want):
        raise ConfigError("a package id is 8 to 64 hex digits (see 'ferry package ls')")
    found = [p for p in pkgcache.cached_packages(args.host.package_cache)
             if p.package_id.startswith(want)]
    if len(found) != 1:
        raise ConfigError(f"{len(found)} cached packages have an id starting {want}"
                          " (see 'ferry package ls')")
    size = pkgcache.entry_bytes(found[0])
    pkgcache.remove_cached(args.host.package_cache, found[0], _in_use(args.host))
    out({"package_ids": [found[0].package_id], "freed_bytes": size},
        lambda: out.console.print(f"removed {found[0].package_id[:12]} "
                                  f"({found[0].manifest.name}), {size >> 20} MiB freed"))


async def _package_prune(args: argparse.Namespace, out: _Out) -> None:
    removed = pkgcache.prune(args.host.package_cache, _in_use(args.host))
    freed = sum(n for _, n in removed)
    out({"package_ids": [p.package_id for p, _ in removed], "freed_bytes": freed},
        lambda: out.console.print(f"removed {len(removed)} packages, {freed >> 20} MiB freed"))


async def _package_push(args: argparse.Namespace, out: _Out) -> None:
    from ferry.s3 import packages as s3_packages
    from ferry.vm.oci import is_oci

    if is_oci(args.url):
        return await _package_push_oci(args, out)
    url = S3URL.parse(args.url)
    out.progress(f"uploading {args.file} to {url}")
    report = await asyncio.to_thread(s3_packages.push_package, args.file, url,
                                     _s3_config(args), overwrite=args.overwrite)
    out({"url": report.url, "file": report.file, "size_bytes": report.size_bytes,
         "duration_s": report.duration_s}, lambda: out.console.print(
        f"{args.file}: pushed to {url} ({report.size_bytes / 2**20:.1f} MiB in "
        f"{report.duration_s:.1f} s)"))


async def _package_pull(args: argparse.Namespace, out: _Out) -> None:
    from ferry.s3 import packages as s3_packages
    from ferry.vm.oci import is_oci

    if is_oci(args.url):
        return await _package_pull_oci(args, out)
    url = S3URL.parse(args.url)
    dest = args.dest if args.dest is not None else s3_packages.default_destination(url)
    trust = TrustStore.from_path(args.trust) if args.trust else TrustStore.for_host(args.host)
    out.progress(f"downloading {url}")
    info, report = await asyncio.to_thread(
        s3_packages.pull_package, url, dest, trust, _s3_config(args),
        overwrite=args.overwrite, progress=_package_progress(out.progress))
    out({**_package_json(info), "url": report.url, "path": report.file,
         "size_bytes": report.size_bytes, "duration_s": report.duration_s},
        lambda: out.console.print(f"{url}: verified ({len(info.files)} files, signed by "
                                  f"{info.key_id}), saved as {report.file}"))


async def _vm_restore(args: argparse.Namespace, out: _Out) -> int:
    from ferry.node import supervisor
    from ferry.vm.mirroring import MirrorSpec

    spec = MirrorSpec(args.url, endpoint_url=args.endpoint_url, region=args.region,
                      profile=args.profile)
    forwards = tuple(parse_publish(s, allow_wildcard=args.allow_wildcard) for s in args.publish)
    vm_id = args.name
    if vm_id is None:
        out.progress(f"reading the newest checkpoint of {args.url}")
        record = await asyncio.to_thread(load_record, spec.store(), spec.layout())
        vm_id = record.vm_id
    mirror = None
    if args.mirror is not None:
        mirror = MirrorSpec(args.mirror, args.mirror_interval, args.endpoint_url, args.region,
                            args.profile)
        await check_prefix_free(mirror.store(), mirror.layout())
    request = supervisor.LaunchRequest(registry.check_vm_id(vm_id), None, args.host, forwards,
                                       labels={}, restore=spec, mirror=mirror)
    return await _hold(request, args, out.console, out)


_HANDLERS: dict[tuple[str, str], Handler] = {
    ("vm", "build"): _vm_build,
    ("vm", "snapshot"): _vm_snapshot,
    ("vm", "run"): _vm_run_command,
    ("vm", "restore"): _vm_restore,
    ("vm", "migrate"): _vm_migration,
    ("vm", "receive"): _vm_migration,
    ("vm", "registry"): _vm_migration,
    ("vm", "migrations"): _vm_migration,
    ("vm", "list"): _vm_list,
    ("vm", "ls"): _vm_list,
    ("vm", "logs"): _vm_logs,
    ("vm", "inspect"): _vm_inspect,
    ("vm", "stats"): _vm_stats,
    ("vm", "rm"): _vm_rm,
    ("vm", "exec"): _vm_exec,
    ("vm", "attach"): _vm_attach,
    ("vm", "stop"): _vm_stop,
    ("volume", "create"): _volume_create,
    ("volume", "list"): _volume_list,
    ("volume", "ls"): _volume_list,
    ("volume", "rm"): _volume_rm,
    ("key", "create"): _key_create,
    ("key", "trust"): _key_trust,
    ("package", "create"): _package_create,
    ("package", "verify"): _package_verify,
    ("package", "extract"): _package_extract,
    ("package", "add"): _package_add,
    ("package", "list"): _package_list,
    ("package", "ls"): _package_list,
    ("package", "rm"): _package_rm,
    ("package", "prune"): _package_prune,
    ("package", "push"): _package_push,
    ("package", "pull"): _package_pull,
}
"""Every ``vm``/``key``/``package`` subcommand and the function that runs it."""


async def _vm_run(args: argparse.Namespace, console: Console, progress: Callable[[str], None],
                  out: Callable[[Any, Callable[[], None]], None]) -> int:
    from ferry.node import supervisor
    from ferry.vm import snapshot
    from ferry.vm.mirroring import MirrorSpec
    from ferry.vm.oci import is_oci, oci_package

    host = args.host
    forwards = tuple(parse_publish(s, allow_wildcard=args.allow_wildcard) for s in args.publish)
    vm_id = registry.check_vm_id(args.name or f"vm-{snapshot.short_id()}")
    package_dir = None
    env: dict[str, str] = {}
    vols: dict[str, str] = {}
    user_data = _user_data(args)
    if args.package is not None and is_oci(args.package):
        if user_data is not None or args.volume:
            raise ConfigError("--user-data and --volume are for packages, not oci:// images "
                              "(-e sets the image process's environment)")
        made = await oci_package(
            args.package, _oci_overrides(args, args.memory_mib), host=host,
            options=PullOptions(max_layer_bytes=args.max_layer_mib * 2**20,
                                tls_verify=args.tls_verify, policy=PullPolicy(args.pull)),
            progress=progress)
        if made.snapshot is not None:
            progress(f"{made.image.reference}: ready after {made.snapshot.ready_s:.1f} s, "
                     f"snapshotted into {made.directory}")
        package_dir = made.directory
    elif args.package is not None:
        _refuse_oci_options(args, "packages")
        if args.memory_mib is not None:
            raise ConfigError("--memory-mib is for oci:// images: a package's memory is fixed")
        package_file = Path(args.package)
        if not await asyncio.to_thread(package_file.is_file):
            raise ConfigError(f"no package file {args.package}")
        trust = TrustStore.from_path(args.trust) if args.trust else TrustStore.for_host(host)
        progress(f"verifying {args.package}")
        opened = pkgcache.open_package(package_file, trust, cache_dir=host.package_cache,
                                       progress=_package_progress(progress))
        package_dir = opened.directory
        env = userdata.parse_env(args.env, _env_files(args))
        vols = volumes.parse_volume_args(args.volume)
    elif args.name is None:
        raise ConfigError("give a package, or --name of a suspended VM")
    elif args.env or args.env_file or user_data is not None or args.volume:
        raise ConfigError("-e, --env-file and --user-data are for a VM run from a package; "
                          "a continued VM keeps the environment it had")
    mirror = None
    if args.mirror is not None:
        mirror = MirrorSpec(args.mirror, args.mirror_interval, args.endpoint_url,
                            args.region, args.profile)
        progress(f"checking {args.mirror}")
        await check_prefix_free(mirror.store(), mirror.layout())
    # Continuing a suspended VM without -p: the forwards it had.
    request = supervisor.LaunchRequest(
        vm_id, package_dir, host, forwards if forwards or package_dir else None,
        labels=None if args.label is None and package_dir is None
        else labels.parse_labels(args.label or ()),
        service_address=args.service_address, env=env, user_data=user_data, volumes=vols,
        user_data_timeout_s=args.user_data_timeout, mirror=mirror)
    return await _hold(request, args, console, out)


async def _hold(request: supervisor.LaunchRequest, args: argparse.Namespace, console: Console,
                out: Callable[[Any, Callable[[], None]], None]) -> int:
    """Run ``request``'s VM: detached (print the ready report) or in this process."""
    from ferry.node import supervisor
    from ferry.node.process import launch_detached

    vm_id = request.vm_id

    def show_ready(report: dict[str, Any]) -> None:
        out(report, lambda: _print_ready(console, report))

    if args.detach:
        show_ready(await launch_detached(request))
        return ExitCode.OK

    def console_out(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    report = await supervisor.supervise(request, on_ready=show_ready,
                                        on_console=None if args.json else console_out)
    if not args.json:
        console.print(f"{vm_id}: stopped ({report.get('mode')})")
    signum = report.get("signal")
    if isinstance(signum, int):  # Ctrl-C or SIGTERM stopped it: say so in the exit code
        return ExitCode.TERMINATED if signum == signal.SIGTERM else ExitCode.INTERRUPTED
    return ExitCode.OK


def _client(args: argparse.Namespace) -> ControlClient:
    """The control client of the VM ``args.vm_id`` on this host."""
    return ControlClient(registry.VMPaths.of(args.host).control_socket(args.vm_id), args.vm_id)


def _print_ready(console: Console, report: dict[str, Any]) -> None:
    t = report["resume"]
    console.print(
        f"[green]{report['vm_id']}[/green] running {t['running_s'] * 1e3:.0f} ms after launch "
        f"(network {t['network_s'] * 1e3:.0f} ms ‖ devices {t['devices_s'] * 1e3:.0f} ms, "
        f"QEMU spawn {t['spawn_s'] * 1e3:.0f} ms, state load {t['load_s'] * 1e3:.0f} ms, "
        f"cont {t['cont_s'] * 1e3:.0f} ms); agent + clock sync {t['agent_s'] * 1e3:.0f} ms")
    restored = report.get("restored_from")
    if restored:
        console.print(f"  resumed from checkpoint {restored['sequence']} of {restored['url']}, "
                      f"taken at {restored['checkpoint']} ({restored['age_s']:.1f} s ago)")
    mirror = report.get("mirror")
    if mirror:
        console.print(f"  mirroring to {mirror['url']} every {mirror['interval_s']:g} s")
    for fwd in report["forwards"]:
        console.print(f"  forward {fwd}")
    ud = report.get("user_data")
    if ud and "exit_code" in ud:
        colour = "green" if ud["exit_code"] == 0 else "red"
        console.print(f"  user data ({ud['kind']}): [{colour}]exit {ud['exit_code']}[/{colour}]"
                      f" after {ud['duration_s']:.1f} s"
                      + (f" at {ud['failed_step']}" if ud.get("failed_step") else ""))


def _print_vms(console: Console, vms: list[dict[str, Any]]) -> None:
    table = Table()
    for col in ("id", "status", "pid", "forwards", "resume"):
        table.add_column(col)
    for v in vms:
        table.add_row(v["vm_id"], v["status"], str(v["pid"] or ""), ", ".join(v["forwards"]),
                      f"{v['resume_ms']} ms" if v["resume_ms"] is not None else "")
    console.print(table)


def _package_progress(progress: Callable[[str], None]) -> Callable[[Progress], None]:
    seen: set[tuple[str, str]] = set()

    def cb(p: Progress) -> None:
        key = (p.phase.value, p.path)
        if key not in seen and p.path:
            seen.add(key)
            progress(f"{p.phase.value} {p.path}")
    return cb


def _package_json(info: PackageInfo) -> dict[str, Any]:
    return {"path": info.path, "key_id": info.key_id, "files": len(info.files),
            "compressed_bytes": info.compressed_bytes, "total_bytes": info.total_bytes,
            "header_sha256": info.header_sha256}


def _add_migration_parsers(vm: Any, add_common: AddCommon) -> None:
    def tls(c: argparse.ArgumentParser) -> None:
        c.add_argument("--tls-cert", type=Path, help="this host's certificate (PEM)")
        c.add_argument("--tls-key", type=Path, help="this host's private key (PEM)")
        c.add_argument("--tls-ca", type=Path, help="CA that signed the peer's certificate")
        c.add_argument("--token-file", type=Path, metavar="PATH",
                       help="the one-time token: written here (mode 0600, its directory made if "
                            "missing) by a listening side, "
                            "read from here by a connecting one (else $FERRY_TOKEN)")
        c.add_argument("--insecure", action="store_true",
                       help="plain TCP without authentication (prints a warning)")

    c = vm.add_parser("migrate", help="live-migrate a VM to another host, or into a package")
    c.add_argument("vm_id")
    to = c.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", metavar="HOST:PORT", help="a 'ferry vm receive' on another host")
    to.add_argument("--to-package", type=Path, metavar="FILE",
                    help="stop the VM into a signed package ('ferry vm run FILE' resumes it)")
    c.add_argument("--precopy-only", action="store_true",
                   help="copy everything before the hand-off (no post-copy risk, more downtime)")
    c.add_argument("--ram", choices=("auto", "qemu", "engine"), default="auto",
                   help="how guest RAM moves: in QEMU's own migration stream over ferry's "
                        "link (qemu), or as a ferry device with post-copy (engine); auto "
                        "(default): qemu where QEMU's dirty tracking is safe (KVM, or "
                        "QEMU >= 9.0), else engine")
    c.add_argument("--max-mbit", type=positive_float, metavar="MBIT",
                   help="cap what the source sends (boot files, blocks, QEMU's stream) at "
                        "MBIT megabits per second")
    c.add_argument("--compression", choices=[x.value for x in LinkCompression],
                   default="auto",
                   help="compress QEMU's RAM stream on the link: auto (default: while it "
                        "makes the link carry more, from its measured speed and the "
                        "data's compressibility), none or zstd")
    c.add_argument("--timeout", type=positive_float, metavar="S",
                   help="cancel the migration if it has not handed off after S seconds "
                        "(the VM keeps running here)")
    c.add_argument("--key", type=Path, help="signing key for --to-package")
    tls(c)
    add_common(c)

    c = vm.add_parser("migrations", help="this host's past outgoing migrations")
    c.add_argument("--vm", dest="vm_filter", metavar="ID", help="only this VM's")
    c.add_argument("-n", "--last", type=int, default=20, metavar="N",
                   help="the newest N (default: 20)")
    add_common(c)

    c = vm.add_parser("receive", help="receive a VM (from 'ferry vm migrate' or a registry)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--listen", metavar="ADDR:PORT", help="wait for one migration here")
    src.add_argument("--registry", metavar="HOST:PORT", help="start a package from a registry")
    c.add_argument("--package", help="package file name on the registry")
    c.add_argument("--name", help="VM id here (default: the source's)")
    c.add_argument("-p", "--publish", action="append", default=None, metavar="SPEC",
                   help="forwards here (default: the source's ports on the --listen address)")
    c.add_argument("--allow-wildcard", action="store_true")
    c.add_argument("--precopy-only", action="store_true")
    c.add_argument("--idle-timeout", type=positive_float, default=IDLE_TIMEOUT_S, metavar="S",
                   help="give up on a source that sends nothing for S seconds while it "
                        f"offers the VM (default {IDLE_TIMEOUT_S:.0f})")
    c.add_argument("-d", "--detach", action="store_true",
                   help="return once listening (--listen) or running (--registry)")
    tls(c)
    add_common(c)

    c = vm.add_parser("registry", help="serve signed packages for remote starts")
    c.add_argument("dir", type=Path, help="directory of package files")
    c.add_argument("--listen", required=True, metavar="ADDR:PORT")
    c.add_argument("--trust", type=Path, help="trust list (default: this host's)")
    tls(c)
    add_common(c)
