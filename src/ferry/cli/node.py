"""``ferry node ls|cordon|uncordon|drain``: the cluster's nodes, through etcd (docs/cluster.md).

Every command talks to etcd (``--cluster etcd://HOST:PORT`` or ``FERRY_CLUSTER``), not
to a daemon: a cordon is a key; a drain is a request key the node watches
(``/ferry/drain/<node>``), and the command then follows the evacuation's operation
record until it finishes (or ``--no-wait``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from ferry.cli.exitcodes import ExitCode
from ferry.cli.output import emit_json
from ferry.errors import ConfigError

WAIT_POLL_S = 0.5


def add_parser(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("node", help="the cluster's nodes: list, cordon, drain; this node's "
                                    "spot notices")
    nodes = p.add_subparsers(dest="node_command", required=True)

    def common(c: argparse.ArgumentParser) -> None:
        c.add_argument("--cluster", metavar="etcd://HOST:PORT[,...]",
                       help="the cluster's etcd (default: $FERRY_CLUSTER)")
        add_common(c)

    common(nodes.add_parser("ls", help="the nodes, their state and capacity"))
    for name, text in (("cordon", "nothing new lands on NODE"),
                       ("uncordon", "NODE takes VMs again")):
        c = nodes.add_parser(name, help=text)
        c.add_argument("node", metavar="NODE")
        common(c)
    c = nodes.add_parser("drain", help="cordon NODE and move every VM out before a deadline")
    c.add_argument("node", metavar="NODE")
    c.add_argument("--deadline", type=float, default=30.0, metavar="S",
                   help="seconds from now every VM must be out by (default 30)")
    c.add_argument("--no-wait", action="store_true", help="request it and return")
    common(c)
    from ferry.cli import spot

    spot.add_watch_parser(nodes, add_common)


async def run(args: argparse.Namespace, console: Console) -> int:
    if args.node_command == "watch-spot":
        from ferry.cli import spot

        return await spot.run(args, console)
    from ferry.cluster import keys as k
    from ferry.cluster.store import ClusterStore, parse_url

    url = args.cluster or os.environ.get("FERRY_CLUSTER")
    if not url:
        raise ConfigError("which cluster? --cluster etcd://HOST:PORT or FERRY_CLUSTER")
    async with ClusterStore(parse_url(url)) as store:
        match args.node_command:
            case "ls":
                views, records = await store.views()
                states = await store.records(k.STATE, k.NodeState)
                cordons = await store.records(k.CORDON, k.Cordon)
                rows = [{"name": n, "state": s.status.value,
                         "cordoned": n in cordons,
                         "api": records[n].api if n in records else None,
                         "vms": records[n].vms if n in records else None,
                         "memory_free_bytes": views[n].free_memory_bytes if n in views
                         else None} for n, s in sorted(states.items())]
                if args.json:
                    emit_json(rows)
                else:
                    for r in rows:
                        console.print(f"{r['name']:<16} {r['state']:<6} "
                                      f"{'cordoned' if r['cordoned'] else '':<9} "
                                      f"vms={r['vms']} api={r['api']}")
            case "cordon":
                await store.cordon(k.check_name(args.node), k.CordonReason.MANUAL)
                console.print(f"node {args.node} cordoned")
            case "uncordon":
                await store.uncordon(k.check_name(args.node))
                console.print(f"node {args.node} uncordoned")
            case "drain":
                return await _drain(store, args, console)
    return ExitCode.OK


async def _drain(store: Any, args: argparse.Namespace, console: Console) -> int:
    from ferry.cluster import keys as k

    node = k.check_name(args.node)
    if args.deadline <= 0:
        raise ConfigError("--deadline must be > 0")
    if await store.record(k.NODES, node, k.NodeRecord) is None:
        raise ConfigError(f"no live node {node!r} in the cluster (see 'ferry node ls')")
    asked = time.time()
    await store.put(k.key(k.DRAIN, node), k.encode(k.DrainRequest(asked + args.deadline,
                                                                  asked)))
    if args.no_wait:
        console.print(f"node {node}: drain requested")
        return ExitCode.OK
    limit = asked + args.deadline + 120  # the node reports past its deadline too
    while time.time() < limit:
        ops = [o for o in (await store.records(k.OPERATIONS, k.OperationRecord)).values()
               if o.node == node and o.started >= asked - 1]
        done = [o for o in ops if o.state is not k.OpState.RUNNING]
        if done:
            result = done[-1].result or {}
            if args.json:
                emit_json(result)
            else:
                console.print(f"node {node}: {len(result.get('moved', []))} moved, "
                              f"{len(result.get('packaged', []))} packaged, "
                              f"{len(result.get('failed', []))} failed in "
                              f"{result.get('elapsed_s')} s")
            return ExitCode.OK if result.get("complete") else ExitCode.ERROR
        await asyncio.sleep(WAIT_POLL_S)
    raise ConfigError(f"node {node} did not report its evacuation in time")
