"""Records of what ferry created, so a later run can remove a crashed run's leftovers.

Each owner (a :class:`~ferry.net.vmnet.VMNetwork` or a set of test hosts)
writes ``<run_dir>/<key>.json`` *before* creating anything, listing the
namespaces, links and nft tables it is about to create and the owner's pid
with that process's start time (so a recycled pid is not mistaken for the
owner). :func:`cleanup_leftovers` deletes everything listed in records whose
owner is dead. Records are written atomically (write + rename), and slot
allocation happens under an ``flock`` on ``<run_dir>/.lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ferry.hostconfig import DEFAULT_RUN_ROOT
from ferry.net import links, netns, nft, service
from ferry.net.errors import NetError

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = DEFAULT_RUN_ROOT / "net"
"""The default host's records. A host with another run root (``$FERRY_RUN_DIR``) passes
its ``HostConfig.net_run_dir``: every ferry caller does; the default is for tests and
library users on a default host."""


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone.

    A zombie counts as gone: it holds nothing any more, and whoever should
    reap it (an init that reaps late, in containers) may take its time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """What one owner created: enough to delete it without the owner."""

    key: str
    kind: str
    owner_pid: int
    owner_start: int | None
    namespaces: tuple[str, ...] = ()
    links: tuple[tuple[str | None, str], ...] = ()
    tables: tuple[nft.TableRef, ...] = ()
    parent: str | None = None
    slot: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_current_process(cls, key: str, kind: str, **kwargs: object) -> OwnerRecord:
        """A record owned by this process."""
        pid = os.getpid()
        return cls(key=key, kind=kind, owner_pid=pid, owner_start=process_start_time(pid),
                   **kwargs)  # type: ignore[arg-type]

    def owner_alive(self) -> bool:
        """Whether the recorded owner process still runs (same pid and start time)."""
        start = process_start_time(self.owner_pid)
        return start is not None and (self.owner_start is None or start == self.owner_start)

    def to_json(self) -> str:
        return json.dumps({
            "key": self.key, "kind": self.kind, "owner_pid": self.owner_pid,
            "owner_start": self.owner_start, "namespaces": list(self.namespaces),
            "links": [list(x) for x in self.links],
            "tables": [[t.namespace, t.family, t.name] for t in self.tables],
            "parent": self.parent, "slot": self.slot, "extra": self.extra,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> OwnerRecord:
        d = json.loads(text)
        return cls(
            key=str(d["key"]), kind=str(d["kind"]), owner_pid=int(d["owner_pid"]),
            owner_start=None if d.get("owner_start") is None else int(d["owner_start"]),
            namespaces=tuple(str(n) for n in d.get("namespaces", [])),
            links=tuple((x[0], str(x[1])) for x in d.get("links", [])),
            tables=tuple(nft.TableRef(t[0], str(t[1]), str(t[2])) for t in d.get("tables", [])),
            parent=d.get("parent"), slot=d.get("slot"),
            extra={str(k): str(v) for k, v in d.get("extra", {}).items()},
        )


class RunDir:
    """The directory of owner records (default ``/run/ferry/net``, emptied at reboot)."""

    def __init__(self, path: Path | str = DEFAULT_RUN_DIR) -> None:
        self.path = Path(path)

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.json"

    def _ensure(self) -> None:
        """The directory, owner-only: its records name VMs, namespaces and addresses."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    def write(self, record: OwnerRecord) -> None:
        """Store ``record`` atomically (mode 0600)."""
        self._ensure()
        tmp = self.path / f".{record.key}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
        os.replace(tmp, self._file(record.key))

    def remove(self, key: str) -> None:
        """Forget a record (after its resources are gone)."""
        with contextlib.suppress(FileNotFoundError):
            self._file(key).unlink()

    def records(self) -> list[OwnerRecord]:
        """Every readable record; unreadable ones are logged and skipped."""
        if not self.path.is_dir():
            return []
        result: list[OwnerRecord] = []
        for f in sorted(self.path.glob("*.json")):
            try:
                result.append(OwnerRecord.from_json(f.read_text()))
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                log.warning("ignoring unreadable network record %s: %s", f, exc)
        return result

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Exclusive across processes (flock) while choosing slots and writing records."""
        self._ensure()
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock


async def remove_resources(record: OwnerRecord, *, keep_service: bool = False) -> None:
    """Delete what ``record`` lists: tables, then links, then namespaces, and the route
    and proxy entry of its service address (``extra``) unless ``keep_service`` (another
    living owner on this host holds that address now).

    Each step is best-effort and idempotent, so a half-built or half-removed
    setup is finished off; a namespace that is already gone is skipped.
    """
    address, dev = record.extra.get("service_address"), record.extra.get("service_dev")
    if address and dev and not keep_service and (record.parent is None
                                                 or netns.exists(record.parent)):
        try:
            await service.withdraw(record.parent, address, dev)
        except NetError as exc:
            log.warning("could not withdraw service address %s: %s", address, exc)
    for table in record.tables:
        if table.namespace is None or netns.exists(table.namespace):
            try:
                await nft.delete_table(table)
            except NetError as exc:
                log.warning("could not delete nft table %s: %s", table, exc)
    for ns, name in record.links:
        if ns is None or netns.exists(ns):
            try:
                await links.delete_link(ns, name)
            except NetError as exc:
                log.warning("could not delete link %s in %s: %s", name, ns, exc)
    for ns in record.namespaces:
        await netns.delete(ns)


async def cleanup_leftovers(run_dir: RunDir | Path | str = DEFAULT_RUN_DIR) -> list[str]:
    """Remove everything recorded by owners that are no longer running.

    Returns the keys of the records cleaned. Records of living owners (this
    process included) are left alone, and so is a ``lab`` (``ferry lab up``: hosts that
    outlive the command that made them, until ``ferry lab down``). VM records go before
    host records, so a VM's table inside a dead test host is removed before that host.
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cleaned: list[str] = []
    async with rd.locked():
        records = rd.records()
        dead = [r for r in records if not r.owner_alive() and r.kind != "lab"]
        dead.sort(key=lambda r: r.kind == "hosts")
        held = {(r.parent, r.extra.get("service_address")) for r in records
                if r.owner_alive() and r.extra.get("service_address")}
        for record in dead:
            log.info("removing leftovers of %s %s (owner pid %d is gone)",
                     record.kind, record.key, record.owner_pid)
            await remove_resources(record, keep_service=(
                record.parent, record.extra.get("service_address")) in held)
            rd.remove(record.key)
            cleaned.append(record.key)
    return cleaned
