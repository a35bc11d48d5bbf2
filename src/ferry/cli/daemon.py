"""``ferry daemon``: this node's daemon in the foreground (docs/daemon.md)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from ferry.cli.exitcodes import ExitCode
from ferry.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("daemon", help="run this node's daemon (HTTP API) in the foreground")
    p.add_argument("--socket", type=Path,
                   help="its UNIX socket (default: <run root>/ferryd.sock, mode 0600)")
    p.add_argument("--listen-tcp", metavar="ADDR:PORT",
                   help="also serve TCP: with mutual TLS (--tls-*), a bearer token "
                        "(--token-file), or both")
    p.add_argument("--token-file", type=Path,
                   help="the TCP bearer token (created with a fresh token if missing)")
    p.add_argument("--tls-cert", type=Path, help="TCP: this node's certificate (ferry certs)")
    p.add_argument("--tls-key", type=Path, help="TCP: its private key")
    p.add_argument("--tls-ca", type=Path,
                   help="TCP: the CA every client's certificate must chain to")
    p.add_argument("--warm-holders", type=int, default=1, metavar="N",
                   help="holder processes kept started ahead of need (0: none; default 1)")
    p.add_argument("--warm-vms", type=int, default=0, metavar="N",
                   help="VMs of the last package run kept resumed ahead of need, each "
                        "holding its RAM (default 0: off)")
    p.add_argument("--no-warm-prime", dest="warm_prime", action="store_false",
                   help="warm VMs wait with QEMU before their state load instead of primed "
                        "(run once, a connection on each published port, then paused)")
    p.add_argument("--cluster", metavar="etcd://HOST:PORT[,...]",
                   help="join this cluster (etcd endpoints; needs --listen-tcp and "
                        "--node-name): docs/cluster.md")
    p.add_argument("--node-name", help="this node's name in the cluster ([a-z0-9-])")
    p.add_argument("--lease-ttl", type=int, default=10, metavar="S",
                   help="seconds without a heartbeat before the node is marked dead "
                        "(default 10)")
    p.add_argument("--max-vms", type=int, default=32, help="VMs this node takes (default 32)")
    p.add_argument("--vm-memory-mib", type=int,
                   help="guest RAM this node offers (default: 80%% of the host's)")
    p.add_argument("--max-incoming", type=int, default=2,
                   help="migrations it receives at once (default 2)")
    p.add_argument("--spot-watch", choices=["auto", "aws", "gcp", "azure"], metavar="PROVIDER",
                   help="watch this provider's metadata service for spot notices (aws, gcp, "
                        "azure or auto): each is a spot.notice event (docs/spot.md)")
    p.add_argument("--metadata-url", default=None, metavar="URL",
                   help="with --spot-watch: where the metadata service answers "
                        "(default http://169.254.169.254)")
    return p


def add_events_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      ) -> argparse.ArgumentParser:
    p = sub.add_parser("events", help="follow this node's daemon's events (VMs, operations)")
    p.add_argument("--socket", type=Path,
                   help="the daemon's UNIX socket (default: <run root>/ferryd.sock)")
    return p


def _event_text(e: dict[str, Any]) -> str:
    if e["kind"] == "operation":
        op = e["operation"]
        error = op.get("error") or {}
        return (f"operation {op['id']} {op['kind']} {op.get('vm_id') or ''} {op['state']}"
                + (f": {error.get('detail')}" if error else ""))
    if e["kind"] == "vm":
        return f"vm {e['vm_id']} {e['status']}"
    if e["kind"] == "spot.notice":
        n = e["notice"]
        return (f"spot notice: {n['provider']} {n['action']} at {n['deadline']} "
                f"(event {n['key']})")
    if e["kind"] == "subscribed":
        return "following the daemon's events; here now: " + (
            ", ".join(f"{v['vm_id']} ({v['status']})" for v in e["vms"]) or "no VMs")
    return json.dumps(e)


async def events(args: argparse.Namespace, console: Console) -> ExitCode:
    """Print the daemon's events as they come (one JSON object per line with --json)."""
    import asyncio

    from ferry.daemon.client import DaemonClient
    from ferry.daemon.serve import SOCKET_NAME

    path = args.socket or args.host.run_root / SOCKET_NAME
    if not path.exists():
        raise ConfigError(f"no daemon socket at {path} (is 'ferry daemon' running?)")
    client = DaemonClient.unix(path)

    loop = asyncio.get_running_loop()
    ended: asyncio.Future[BaseException | None] = loop.create_future()

    def follow() -> None:
        error: BaseException | None = None
        try:
            for event in client.events(timeout_s=None):
                print(json.dumps(event) if args.json else _event_text(event), flush=True)
        except BaseException as exc:  # handed to the loop below
            error = exc
        def settle() -> None:
            if not ended.done():
                ended.set_result(error)
        loop.call_soon_threadsafe(settle)

    # A daemon thread, not the executor: Ctrl-C ends the command without waiting for the
    # blocked read (the executor would be joined at exit).
    threading.Thread(target=follow, name="events", daemon=True).start()
    error = await ended
    if error is not None:
        raise error
    return ExitCode.OK


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen-tcp wants ADDR:PORT, not {text!r}")
    return host.strip("[]"), int(port)


async def daemon(args: argparse.Namespace, console: Console) -> ExitCode:
    from ferry.daemon.api import create_app
    from ferry.daemon.serve import SOCKET_NAME, TCPAccess, serve

    tcp = _address(args.listen_tcp) if args.listen_tcp else None
    tls_files = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls_files) and not all(tls_files):
        raise ConfigError("mutual TLS needs --tls-cert, --tls-key and --tls-ca")
    access = None
    if tcp is not None:
        if args.token_file is None and not all(tls_files):
            raise ConfigError("--listen-tcp needs mutual TLS (--tls-cert, --tls-key, "
                              "--tls-ca) or a bearer token (--token-file)")
        access = TCPAccess(token_file=args.token_file,
                           tls=tls_files if all(tls_files) else None)
    path = args.socket or args.host.run_root / SOCKET_NAME

    def listening(info: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps({"event": "listening", **info}), flush=True)
        else:
            where = info["socket"] + (f" and tcp {info['tcp'][0]}:{info['tcp'][1]}"
                                      if "tcp" in info else "")
            console.print(f"ferry daemon: listening on {where}")
        sys.stdout.flush()

    if args.warm_holders < 0 or args.warm_vms < 0:
        raise ConfigError("--warm-holders and --warm-vms must be >= 0")
    from ferry.spot import METADATA_URL

    if args.metadata_url and not args.spot_watch:
        raise ConfigError("--metadata-url goes with --spot-watch")
    cluster, peers, api_auth = _cluster(args, tcp, access)
    app = create_app(args.host, warm_holders=args.warm_holders, warm_vms=args.warm_vms,
                     warm_prime=args.warm_prime,
                     cluster=cluster, peers=peers, api_auth=api_auth,
                     spot_watch=args.spot_watch, metadata_url=args.metadata_url or METADATA_URL)

    def listening_and_join(info: dict[str, Any]) -> None:
        if cluster is not None and "tcp" in info:
            app.state.daemon.cluster.set_api(info["tcp"][0], int(info["tcp"][1]))
        listening(info)

    await serve(app, unix_path=path, tcp=tcp, access=access,
                on_listening=listening_and_join)
    return ExitCode.OK


def _cluster(args: argparse.Namespace, tcp: tuple[str, int] | None,
             access: Any) -> tuple[Any, Any, list[str]]:
    """The cluster's configuration from ``--cluster`` and friends; (None, None, []) without."""
    if args.cluster is None:
        return None, None, []
    from ferry.cluster.store import parse_url
    from ferry.daemon.cluster import ClusterConfig, PeerAccess
    from ferry.daemon.serve import load_token
    from ferry.transport import tls

    if tcp is None or access is None or not args.node_name:
        raise ConfigError("--cluster needs --listen-tcp (the API other nodes call) and "
                          "--node-name")
    if tcp[0] in ("0.0.0.0", "::"):
        raise ConfigError("--cluster: --listen-tcp must name this node's address (other "
                          "nodes call it there)")
    config = ClusterConfig(parse_url(args.cluster), args.node_name,
                           lease_ttl_s=args.lease_ttl, max_vms=args.max_vms,
                           memory_bytes=None if args.vm_memory_mib is None
                           else args.vm_memory_mib * 1024 * 1024,
                           max_incoming=args.max_incoming)
    token = load_token(access.token_file) if access.token_file is not None else None
    ctx = tls.client_context(*access.tls) if access.tls is not None else None
    auth = [a for a, on in (("mtls", ctx is not None), ("token", token is not None)) if on]
    return config, PeerAccess(token, ctx), auth

