"""A real etcd for tests, demos and benchmarks: Debian's ``etcd-server``, started and stopped.

:func:`etcd_cluster` starts ``members`` etcd processes (one by default; three for the
test that loses a member) with their data in a temporary directory, on loopback with
free ports, or on the addresses the caller gives (a namespace host's, with ``wrap``
turning each command line into one run on that host). Each member is ready once
``/health`` answers; on exit every member gets SIGTERM (SIGKILL after a grace) and its
data directory is removed, even after a failure::

    async with etcd_cluster() as etcd:
        etcd.endpoints      # [("127.0.0.1", 40123)]
        etcd.url            # "etcd://127.0.0.1:40123"

:meth:`EtcdCluster.kill` ends one member at once (SIGKILL), as a crashed machine would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferry.errors import FerryError

ETCD = "etcd"
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0

Wrap = Callable[[int, Sequence[str]], list[str]]
"""Member index and its command line -> the command line to run (e.g. inside a
namespace host); the identity by default."""


class EtcdStartError(FerryError):
    """An etcd member did not start or did not become healthy in time."""


@dataclass
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: asyncio.subprocess.Process | None = None
    log: Path = field(default_factory=Path)
    argv: list[str] = field(default_factory=list)
    """The command line it was started with (:meth:`EtcdCluster.restart` reuses it)."""

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    _health: Callable[[str], bool] = lambda url: _healthy(url)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(m.host, m.client_port) for m in self.members]

    @property
    def url(self) -> str:
        """``etcd://HOST:PORT[,HOST:PORT...]``: what ``ferry daemon --cluster`` takes."""
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    async def restart(self, index: int) -> None:
        """Start member ``index`` again (after :meth:`kill`) on its data; until healthy."""
        member = self.members[index]
        await _spawn(member)
        await _wait_healthy(member, self._health)

    async def kill(self, index: int) -> None:
        """SIGKILL member ``index`` (a machine that died)."""
        member = self.members[index]
        if member.proc is not None and member.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                member.proc.kill()
            await member.proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _argv(m: EtcdMember, initial_cluster: str, token: str) -> list[str]:
    return [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            # Tests move fast: a leader is elected in well under a second on loopback.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--log-level", "warn"]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


async def _wait_healthy(m: EtcdMember, health: Callable[[str], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while not await asyncio.to_thread(health, m.client_url):
        if m.proc is not None and m.proc.returncode is not None:
            raise EtcdStartError(f"etcd member {m.name} exited {m.proc.returncode}: "
                                 f"{m.log.read_text(errors='replace')[-1500:]}")
        if loop.time() >= deadline:
            raise EtcdStartError(f"etcd member {m.name} not healthy within "
                                 f"{READY_TIMEOUT_S:g} s")
        await asyncio.sleep(0.1)


async def _spawn(m: EtcdMember) -> None:
    with m.log.open("ab") as log:
        m.proc = await asyncio.create_subprocess_exec(
            *m.argv, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)


async def _stop(m: EtcdMember) -> None:
    proc = m.proc
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_GRACE_S):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def etcd_cluster(members: int = 1, *, hosts: Sequence[str] | None = None,
                       wrap: Wrap | None = None,
                       health: Callable[[str], bool] | None = None,
                       ) -> AsyncIterator[EtcdCluster]:
    """``members`` etcd processes (their data in a temporary directory) until exit.

    ``hosts`` gives each member's address (default loopback, free ports picked here;
    on a namespace host, fixed ports 2379/2380 are free by construction); ``wrap``
    turns a member's command line into one run on its host; ``health`` checks a client
    URL (from inside the host, where the caller cannot reach it directly)."""
    if shutil.which(ETCD) is None:
        raise EtcdStartError("no etcd binary: install Debian's etcd-server "
                             "(scripts/setup.sh)")
    root = Path(tempfile.mkdtemp(prefix="ferry-etcd-"))
    addresses = list(hosts) if hosts is not None else ["127.0.0.1"] * members
    if len(addresses) != members:
        raise EtcdStartError(f"{members} members but {len(addresses)} hosts")
    cluster = EtcdCluster([])
    for i, host in enumerate(addresses):
        loopback = hosts is None
        cluster.members.append(EtcdMember(
            f"m{i}", host, free_port(host) if loopback else 2379,
            free_port(host) if loopback else 2380, root / f"m{i}", log=root / f"m{i}.log"))
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
    token = f"ferry-{os.getpid()}-{os.urandom(4).hex()}"
    cluster._health = health or _healthy
    try:
        for i, m in enumerate(cluster.members):
            m.argv = _argv(m, initial, token)
            if wrap is not None:
                m.argv = wrap(i, m.argv)
            await _spawn(m)
        await asyncio.gather(*(_wait_healthy(m, cluster._health) for m in cluster.members))
        yield cluster
    finally:
        await asyncio.gather(*(_stop(m) for m in cluster.members))
        shutil.rmtree(root, ignore_errors=True)
