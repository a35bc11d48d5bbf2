"""Namespace hosts driven through the ``ferry`` CLI, the way users drive real hosts.

A :class:`Site` gives every host of a :class:`~ferry.testing.hosts.HostSet`
its own ferry run and state dirs and runs ``python -m ferry.cli.main`` inside
the host's network namespace: ``ferry vm run --detach`` on one host,
``ferry vm receive --detach --listen`` on another, ``ferry vm migrate --to``
between them (:meth:`Site.hop`). The demo, the live-migration benchmark and
the e2e tests all move VMs through it, so they measure and test the commands
users type and nothing else.

:func:`downtime` is the one place that picks the downtime (its figure, its
steps, who measured it) out of the summary ``ferry vm migrate --json`` prints
(read with :meth:`~ferry.live.summary.MigrationSummary.from_json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.live.summary import MigrationSummary
from ferry.net import cleanup_leftovers as cleanup_networks
from ferry.testing.hosts import HostSet, host_namespaces
from ferry.vm.registry import (
    SUPERVISOR_RECORD,
    VMPaths,
    cleanup_leftovers,
    process_alive,
    read_json,
)

FERRY = (sys.executable, "-m", "ferry.cli.main")
CLI_TIMEOUT_S = 120.0
"""A command that has not exited by then hangs (the longest, a migration on a slow
machine, takes ~15 s): :meth:`Site.run` then shows where every holder waits, well
before the e2e suite's 300-s per-test timeout would end the test without that."""
STOP_GRACE_S = 10.0

LIVE_SITES: weakref.WeakSet[Site] = weakref.WeakSet()
"""The sites :func:`site_on_hosts` has up: the e2e suite prints their holders' logs
(:meth:`Site.holder_logs`) beside a failed test's report."""

AccessArgs = Callable[[str], Sequence[str]]
"""A host's authentication options for ``vm receive`` / ``vm migrate`` (e.g. its
``--tls-cert/--tls-key/--tls-ca``); by default the destination's token file."""


@dataclass(frozen=True, slots=True)
class Downtime:
    """One hop's downtime, source paused -> destination running (docs/live-migration.md,
    "Downtime"), as the summary of ``ferry vm migrate --json`` gives it."""

    corrected_ms: float | None
    """On both hosts' clocks, offset-corrected by the clock exchange (None without one)."""
    uncertainty_ms: float | None
    """The corrected figure is right within plus or minus this."""
    source_view_ms: float
    """On the source's clock alone: pause -> the destination's "running" acknowledged."""
    steps_ms: dict[str, float]

    @property
    def ms(self) -> float:
        """The best figure there is: the corrected one, else the source's view."""
        return self.source_view_ms if self.corrected_ms is None else self.corrected_ms


def downtime(summary: MigrationSummary) -> Downtime:
    """The downtime figures of a hop's summary (the source's view is always there once
    a migration completed; FerryError if it is not)."""
    d = summary.downtime
    if d.source_view_ms is None:
        raise FerryError(f"vm {summary.vm}: the summary has no downtime_source_view_ms")
    return Downtime(d.corrected_ms, d.corrected_uncertainty_ms, d.source_view_ms,
                    dict(d.steps_ms))


class CliError(FerryError):
    """A ``ferry`` command exited non-zero."""

    def __init__(self, message: str, *, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


class Site:
    """Hosts of ``hosts``, each with ``root/<host>/run`` and ``root/<host>/state``.

    ``env`` adds to every command's environment (a trust dir, a package cache).
    """

    def __init__(self, hosts: HostSet, root: Path, env: Mapping[str, str] | None = None) -> None:
        self.hosts = hosts
        self.root = root
        self.env = dict(env or {})
        self._receivers: dict[str, list[int]] = {}

    def paths(self, host: str) -> VMPaths:
        return VMPaths(self.root / host / "run", self.root / host / "state")

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def token_file(self, host: str) -> Path:
        """Where ``host``'s listening side writes its one-time token (mode 0600)."""
        return self.root / f"{host}.token"

    async def start(self, host: str, *args: str,
                    stdin: int | None = None) -> asyncio.subprocess.Process:
        """``ferry ARGS`` started on ``host`` (``ip netns exec`` execs it: the pid is
        ferry's, so a signal sent to it reaches the command as a user's Ctrl-C would)."""
        paths = self.paths(host)
        env = {**os.environ, **self.env, "FERRY_RUN_DIR": str(paths.run_root),
               "FERRY_STATE_DIR": str(paths.state_root)}
        return await asyncio.create_subprocess_exec(
            *self.hosts[host].exec_argv([*FERRY, *args]), env=env, stdin=stdin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def run(self, host: str, *args: str, timeout_s: float = CLI_TIMEOUT_S,
                  input: bytes | None = None) -> CliResult:
        """``ferry ARGS`` on ``host``, whatever its exit code (``input`` on its stdin)."""
        proc = await self.start(host, *args,
                                stdin=None if input is None else asyncio.subprocess.PIPE)
        talk = asyncio.ensure_future(proc.communicate(input))
        try:
            done, _ = await asyncio.wait({talk}, timeout=timeout_s)
        except BaseException:
            talk.cancel()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if not done:
            # Hung: where it waits (SIGUSR1: the CLI logs its tasks' stacks to stderr),
            # where every holder waits, then the end of what it printed.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)
            await self.dump_holders()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait({talk}, timeout=10)
            said = talk.result()[1].decode(errors="replace") if talk.done() else ""
            print(f"==== ferry {' '.join(args)} on {host}: no exit within {timeout_s:g} s; "
                  f"its stderr:\n{said[-8000:]}")
            raise TimeoutError(f"ferry {' '.join(args)} on {host}: no exit within "
                               f"{timeout_s:g} s")
        out, err = talk.result()
        assert proc.returncode is not None
        return CliResult(proc.returncode, out.decode(errors="replace"),
                         err.decode(errors="replace"))

    async def dump_holders(self, lines: int = 200) -> None:
        """Print where every VM holder of every host waits (SIGUSR1 makes each log its
        tasks' stacks) and the end of its log: what a test shows when a command hangs."""
        print(await asyncio.to_thread(self.holder_logs, lines))

    def holder_logs(self, lines: int = 120) -> str:
        """Every live VM holder's log tail after SIGUSR1 made it log where its tasks
        wait ("" if no holder runs): what an e2e test shows when it fails."""
        logs = [p for host in self.hosts for p in
                (self.paths(host).run_root / "vms").glob(".holder-*.log")]
        signalled = []
        for path in logs:
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.kill(int(path.stem.removeprefix(".holder-")), signal.SIGUSR1)
                signalled.append(path)
        if not signalled:
            return ""
        time.sleep(1.0)  # each holder logs its stacks from its own loop
        out = []
        for path in signalled:
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"==== {path}\n" + "\n".join(tail))
        return "\n".join(out)

    async def ferry(self, host: str, *args: str, timeout_s: float = CLI_TIMEOUT_S,
                    input: bytes | None = None) -> str:
        """``ferry ARGS`` on ``host``; its stdout. :class:`CliError` if it fails."""
        r = await self.run(host, *args, timeout_s=timeout_s, input=input)
        if r.returncode != 0:
            raise CliError(f"ferry {' '.join(args)} on {host} exited {r.returncode}: "
                           f"{r.stderr[-2000:]}", returncode=r.returncode, stderr=r.stderr)
        return r.stdout

    async def ferry_json(self, host: str, *args: str,
                         timeout_s: float = CLI_TIMEOUT_S) -> Any:
        return json.loads(await self.ferry(host, *args, "--json", timeout_s=timeout_s))

    async def vm_run(self, host: str, name: str, package: Path, *extra: str) -> Any:
        """``ferry vm run --detach --name NAME [EXTRA] PACKAGE`` on ``host``."""
        return await self.ferry_json(host, "vm", "run", "--detach", "--name", name, *extra,
                                     str(package))

    def _access(self, host: str, access: AccessArgs | None) -> Sequence[str]:
        return ("--token-file", str(self.token_file(host))) if access is None else access(host)

    async def receive(self, host: str, port: int, *extra: str,
                      access: AccessArgs | None = None) -> dict[str, Any]:
        """``ferry vm receive --detach --listen HOST:PORT`` (its token into
        :meth:`token_file` unless ``access`` says otherwise)."""
        event = await self.ferry_json(host, "vm", "receive", "--detach", "--listen",
                                      f"{self.address(host)}:{port}",
                                      *self._access(host, access), *extra)
        if not isinstance(event, dict) or not isinstance(event.get("pid"), int):
            raise FerryError(f"ferry vm receive on {host}: unexpected reply {event!r}")
        self._receivers.setdefault(host, []).append(event["pid"])
        return event

    def migrate_args(self, vm: str, src: str, dst: str, port: int,
                     access: AccessArgs | None = None) -> tuple[str, ...]:
        """``vm migrate VM --to DST:PORT`` as run on ``src`` (with ``dst``'s token file
        unless ``access`` says otherwise)."""
        return ("vm", "migrate", vm, "--to", f"{self.address(dst)}:{port}",
                *(self._access(dst, None) if access is None else access(src)))

    async def hop(self, vm: str, src: str, dst: str, port: int, *migrate_extra: str,
                  access: AccessArgs | None = None) -> dict[str, Any]:
        """Move ``vm`` from ``src`` to ``dst`` as a user would: ``ferry vm receive`` on
        ``dst``, then ``ferry vm migrate --json`` on ``src``; the migrate reply."""
        await self.receive(dst, port, access=access)
        reply = await self.ferry_json(src, *self.migrate_args(vm, src, dst, port, access),
                                      *migrate_extra)
        if not isinstance(reply, dict) or "summary" not in reply:
            raise FerryError(f"ferry vm migrate {vm}: unexpected reply {reply!r}")
        return reply

    async def stop_all(self) -> None:
        """Stop whatever still runs on every host (supervisors, listening receivers) and
        remove what they leave behind: mounts, run dirs, VM networks."""
        for host in self.hosts:
            await self.stop_host(host)

    async def stop_host(self, host: str) -> None:
        await stop_holders(self.paths(host), also=self._receivers.pop(host, []))


async def stop_holders(paths: VMPaths, *, also: Sequence[int] = ()) -> None:
    """SIGTERM every VM holder ``paths`` has records of (and the pids ``also``), wait for
    each (SIGKILL after :data:`STOP_GRACE_S`), then remove what they leave behind: mounts,
    run dirs, VM networks."""
    pids = holder_pids(paths) + list(also)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    await asyncio.gather(*(_wait_gone(pid) for pid in pids))
    await cleanup_leftovers(paths)
    await cleanup_networks(run_dir=paths.net_run_dir)


def holder_pids(paths: VMPaths) -> list[int]:
    """The pids of the VM holders ``paths`` has records of (a receiver still waiting for
    its VM has none yet)."""
    return [p for rec in (paths.run_root / "vms").glob(f"*/{SUPERVISOR_RECORD}")
            if isinstance(p := (read_json(rec) or {}).get("pid"), int)]


async def _wait_gone(pid: int) -> None:
    """Until ``pid`` exited (a zombie counts: this machine's init reaps late); SIGKILL
    after :data:`STOP_GRACE_S`, and wait for that too: cleaning up after a process that
    still runs would skip what it owns."""
    if await exited_within(pid, STOP_GRACE_S):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    await exited_within(pid, STOP_GRACE_S)


async def exited_within(pid: int, timeout_s: float) -> bool:
    """Whether ``pid`` is gone (or a zombie) within ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while process_alive(pid, None):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@contextlib.asynccontextmanager
async def site_on_hosts(names: Sequence[str], root: Path, env: Mapping[str, str], *,
                        switch_tag: str) -> AsyncIterator[Site]:
    """Namespace hosts ``names`` on one switch and a :class:`Site` over them (each host's
    ferry directories under ``root/hosts``, one package cache ``root/pkgcache``); on exit
    whatever still runs on them is stopped and their leftovers removed (a test module's
    ``site`` fixture)."""
    env = {**env, "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
    async with host_namespaces(list(names), switch_tag=switch_tag) as hosts:
        site = Site(hosts, root / "hosts", env)
        LIVE_SITES.add(site)
        try:
            yield site
        finally:
            LIVE_SITES.discard(site)
            await site.stop_all()
            await cleanup_networks()


@contextlib.contextmanager
def scratch_root(prefix: str) -> Iterator[Path]:
    """A short temporary directory (UNIX socket paths stay short), removed on exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
