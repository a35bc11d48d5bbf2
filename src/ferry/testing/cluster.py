"""A cluster on namespace hosts: one etcd host and a ``ferry daemon --cluster`` per node.

:func:`cluster_on_hosts` builds the hosts (:func:`~ferry.testing.site.site_on_hosts`),
starts one etcd member on its own host (:func:`~ferry.testing.etcd.etcd_cluster`), and a
daemon on every node host listening on the host's address with one shared bearer token
(how the cluster's nodes call each other), joined to the etcd with a short lease. The
e2e tests, ``bench/evacuate.py`` and demos use it; on exit the daemons get SIGTERM and
everything the site made is removed.

``spot`` gives some nodes a provider's metadata service: an emulator
(:class:`~ferry.testing.metadata.MetadataEmulator`, served by this process) answers at
169.254.169.254 inside that node's namespace, and its daemon runs with ``--spot-watch
PROVIDER`` against it, exactly as in a cloud; :attr:`ClusterSite.metadata` holds the
emulators, to inject notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.daemon.client import DaemonClient
from ferry.errors import FerryError
from ferry.testing.etcd import EtcdCluster, etcd_cluster
from ferry.testing.metadata import MetadataEmulator, emulator_in
from ferry.testing.site import Site, site_on_hosts
from ferry.transport.auth import new_token, write_token_file

API_PORT = 7480
START_TIMEOUT_S = 60.0


@dataclass
class ClusterSite:
    site: Site
    url: str
    """The etcd URL the daemons joined (``etcd://ADDR:2379``)."""
    nodes: list[str]
    etcd: EtcdCluster
    etcd_host: str
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    metadata: dict[str, MetadataEmulator] = field(default_factory=dict)
    """Node -> the metadata emulator in its namespace (the nodes given ``spot``)."""

    def api(self, node: str) -> DaemonClient:
        """``node``'s daemon over its UNIX socket (reachable from outside the namespace)."""
        return DaemonClient.unix(self.site.paths(node).run_root / "ferryd.sock")

    async def call(self, node: str, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.api(node).call, method, path, body)

    async def wait(self, node: str, op: dict[str, Any]) -> Any:
        return await asyncio.to_thread(self.api(node).wait, op)


def health_in(site: Site, host: str) -> Callable[[str], bool]:
    """etcd's health checked from inside ``host`` (the switch has no uplink)."""
    def check(url: str) -> bool:
        code = (f"import urllib.request,sys; sys.exit(0 if b'true' in urllib.request."
                f"urlopen('{url}/health', timeout=2).read() else 1)")
        try:
            return subprocess.run(site.hosts[host].exec_argv([sys.executable, "-c", code]),
                                  capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False
    return check


@contextlib.asynccontextmanager
async def cluster_on_hosts(nodes: Sequence[str], root: Path, env: Mapping[str, str], *,
                           switch_tag: str, lease_ttl_s: int = 3, vm_memory_mib: int = 1024,
                           max_incoming: int = 2, etcd_host: str | None = None,
                           lease_ttl_by_node: Mapping[str, int] | None = None,
                           spot: Mapping[str, str] | None = None,
                           ) -> AsyncIterator[ClusterSite]:
    """``lease_ttl_by_node`` overrides ``lease_ttl_s`` for some nodes (one whose death
    must go unnoticed for a while); ``spot`` maps nodes to the provider (aws, gcp,
    azure) whose metadata service their namespace emulates and their daemon watches.
    etcd runs on host ``etcd_host`` (default ``<switch_tag>-etcd``: host names are
    machine-wide, tests running at once must not share one)."""
    etcd_host = etcd_host or f"{switch_tag}-etcd"
    async with contextlib.AsyncExitStack() as stack:
        site = await stack.enter_async_context(
            site_on_hosts([etcd_host, *nodes], root, env, switch_tag=switch_tag))
        etcd = await stack.enter_async_context(etcd_cluster(
            1, hosts=[site.address(etcd_host)],
            wrap=lambda i, argv: site.hosts[etcd_host].exec_argv(argv),
            health=health_in(site, etcd_host)))
        token = root / "cluster.token"
        write_token_file(token, new_token())
        c = ClusterSite(site, etcd.url, list(nodes), etcd, etcd_host)
        for h, provider in (spot or {}).items():
            c.metadata[h] = await stack.enter_async_context(emulator_in(
                site.hosts[h].namespace, [provider], vm_name=h, add_address=True))
        try:
            for h in nodes:
                watch = ["--spot-watch", spot[h]] if spot and h in spot else []
                c.procs[h] = await site.start(
                    h, "daemon", "--json", "--warm-holders", "0",
                    "--listen-tcp", f"{site.address(h)}:{API_PORT}",
                    "--token-file", str(token), "--cluster", etcd.url, "--node-name", h,
                    "--lease-ttl", str((lease_ttl_by_node or {}).get(h, lease_ttl_s)),
                    "--vm-memory-mib", str(vm_memory_mib),
                    "--max-incoming", str(max_incoming), *watch)
            for h, proc in c.procs.items():
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
                if not line or json.loads(line).get("event") != "listening":
                    err = b"" if proc.stderr is None else await proc.stderr.read()
                    raise FerryError(f"the daemon on {h} did not start: "
                                     f"{err.decode(errors='replace')[-2000:]}")
            yield c
        finally:
            for proc in c.procs.values():
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.communicate(), 30)


async def all_alive(c: ClusterSite, ask: str) -> bool:
    """Whether ``ask``'s view of the cluster has every node registered and alive."""
    view = await c.call(ask, "GET", "/v1/cluster")
    return sorted(n["name"] for n in view["nodes"] if n["record"] and n["state"]
                  and n["state"]["status"] == "alive") == sorted(c.nodes)


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout_s: float = 60.0,
                every_s: float = 0.1) -> Any:
    """``check()``'s first truthy answer, asked every ``every_s``; TimeoutError naming
    ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (got := await check()):
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what} ({timeout_s:g} s)")
        await asyncio.sleep(every_s)
    return got
