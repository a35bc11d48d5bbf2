"""``ferry image pull REF``: an OCI image into the cache as an ext4 root filesystem.

Parsing only; the work is :func:`ferry.oci.pull` (docs/oci.md).
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from ferry.cli.args import positive_int
from ferry.cli.exitcodes import ExitCode
from ferry.cli.output import emit_json
from ferry.oci import PullOptions, pull
from ferry.oci.pull import DEFAULT_MAX_LAYER_BYTES


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("image", help="OCI images (docs/oci.md)")
    image = p.add_subparsers(dest="image_command", required=True)
    pull_p = image.add_parser("pull", help="pull REGISTRY/REPO:TAG into an ext4 root filesystem")
    pull_p.add_argument("reference", help="[REGISTRY/]REPO[:TAG][@sha256:DIGEST]")
    pull_p.add_argument("--max-layer-mib", type=positive_int,
                        default=DEFAULT_MAX_LAYER_BYTES // 2**20,
                        help="refuse a layer larger than this, compressed or not "
                             f"(default {DEFAULT_MAX_LAYER_BYTES // 2**20})")
    tls = pull_p.add_mutually_exclusive_group()
    tls.add_argument("--tls-verify", dest="tls_verify", action="store_true", default=None,
                     help="HTTPS with a verified certificate even on loopback")
    tls.add_argument("--insecure", dest="tls_verify", action="store_false",
                     help="plain HTTP or an unverified certificate (default on loopback only)")
    return pull_p


def pull_options(args: argparse.Namespace) -> PullOptions:
    return PullOptions(max_layer_bytes=args.max_layer_mib * 2**20, tls_verify=args.tls_verify)


async def run(args: argparse.Namespace, console: Console) -> ExitCode:
    img = await pull(args.reference, cache_dir=args.host.cache_root, options=pull_options(args))
    if args.json:
        emit_json(img.to_json())
        return ExitCode.OK
    c = img.config
    console.print(f"{'cached' if img.cache_hit else 'pulled'} {escape(img.reference)} "
                  f"{img.digest}")
    console.print(f"  rootfs      {escape(str(img.rootfs))} "
                  f"({img.content_bytes / 2**20:.1f} MiB of files)")
    console.print(f"  entrypoint  {escape(str(list(c.entrypoint)))}  "
                  f"cmd {escape(str(list(c.cmd)))}")
    console.print(f"  workdir     {escape(c.workdir or '/')}  user {escape(c.user or 'root')}  "
                  f"ports {' '.join(str(p) for p in c.exposed_ports) or '-'}")
    return ExitCode.OK
