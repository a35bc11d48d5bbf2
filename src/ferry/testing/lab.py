"""A lab: hosts made of network namespaces on this machine that outlive the command that
made them, so a multi-host walkthrough runs from a shell (``ferry lab``).

::

    ferry lab up a b                 # ferry-host-a 10.77.0.1, ferry-host-b 10.77.0.2
    ferry lab exec a -- ferry vm run --detach --name r1 -p 10.77.0.1:16379:6379 redis.ferry
    ferry lab exec b -- ferry vm receive --detach --listen 10.77.0.2:7400 --token-file b.token
    ferry lab exec a -- ferry vm migrate r1 --to 10.77.0.2:7400 --token-file b.token
    ferry lab down

The hosts are the ones of :mod:`ferry.testing.hosts` (one switch namespace, a veth per
host, no uplink: nothing leaves the machine). Each host has its own ferry run and state
directories (``<run root>/lab/<name>`` and ``<state root>/lab/<name>``; ``ferry lab exec``
sets ``FERRY_RUN_DIR`` and ``FERRY_STATE_DIR``), as separate machines would; keys, trust
list and caches are this machine's. The lab is recorded in the machine's network run dir
as kind ``lab``, which the leftover cleanup keeps (its creator has exited by design), and
in ``<state root>/lab/lab.json``; ``ferry lab down`` stops the VMs still held on its hosts
and removes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError
from ferry.hostconfig import HostConfig
from ferry.net import netns
from ferry.net.errors import NamespaceError
from ferry.net.state import OwnerRecord, RunDir, remove_resources
from ferry.testing.hosts import (
    DEFAULT_HOST_SUBNET,
    HostNamespace,
    build_hosts,
    check_host_names,
    host_namespace_name,
)
from ferry.testing.site import exited_within
from ferry.vm.registry import VMPaths, process_alive, read_json

log = logging.getLogger(__name__)

LAB_KIND = "lab"
"""Records of this kind are kept by :func:`ferry.net.state.cleanup_leftovers`."""
LAB_KEY = "lab"
SWITCH = f"{netns.PREFIX}hsw-lab"
STOP_WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class LabHost:
    name: str
    address: str

    @property
    def namespace(self) -> str:
        return host_namespace_name(self.name)


def _lab_file(host: HostConfig) -> Path:
    return host.state_root / "lab" / "lab.json"


def host_paths(host: HostConfig, name: str) -> VMPaths:
    """The ferry run and state directories of lab host ``name``."""
    return VMPaths(host.run_root / "lab" / name, host.state_root / "lab" / name)


def lab_hosts(host: HostConfig) -> list[LabHost]:
    """The hosts of this machine's lab ([] without one)."""
    data = read_json(_lab_file(host)) or {}
    return [LabHost(str(h["name"]), str(h["address"])) for h in data.get("hosts", [])]


def exec_argv(host: HostConfig, name: str, argv: Sequence[str],
              environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` run on lab host ``name`` (inside its namespace, with its own ferry
    directories): the command line and its environment."""
    if name not in {h.name for h in lab_hosts(host)}:
        raise ConfigError(f"no lab host {name!r} (see 'ferry lab ls')")
    if not argv:
        raise ConfigError("no command given: ferry lab exec HOST -- CMD...")
    paths = host_paths(host, name)
    env = {**environ, "FERRY_RUN_DIR": str(paths.run_root),
           "FERRY_STATE_DIR": str(paths.state_root)}
    return netns.netns_exec_argv(host_namespace_name(name), list(argv)), env


async def lab_up(host: HostConfig, names: Sequence[str], *,
                 subnet: ipaddress.IPv4Network = DEFAULT_HOST_SUBNET) -> list[LabHost]:
    """Create the lab's hosts on one switch (host ``i`` gets the ``i+1``-th address of
    ``subnet``). One lab per machine: :class:`ConfigError` if there is one."""
    check_host_names(names, subnet)
    if lab_hosts(host) or netns.exists(SWITCH):
        raise ConfigError("a lab exists on this machine already ('ferry lab down' first)")
    hosts = [LabHost(n, str(subnet.network_address + i + 1)) for i, n in enumerate(names)]
    for h in hosts:
        if netns.exists(h.namespace):
            raise NamespaceError("already exists", namespace=h.namespace)
    record = OwnerRecord.for_current_process(
        LAB_KEY, LAB_KIND, namespaces=(*(h.namespace for h in hosts), SWITCH))
    rd = RunDir(host.net_run_dir)
    async with rd.locked():
        rd.write(record)
    try:
        await build_hosts(SWITCH, [HostNamespace(h.name, h.namespace, h.address, SWITCH)
                                   for h in hosts], subnet)
        path = _lab_file(host)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"subnet": str(subnet), "switch": SWITCH,
                                   "hosts": [{"name": h.name, "address": h.address}
                                             for h in hosts]}))
        os.replace(tmp, path)
    except BaseException:
        await remove_resources(record)
        rd.remove(record.key)
        raise
    return hosts


async def lab_down(host: HostConfig) -> list[str]:
    """Stop the VMs held on the lab's hosts (SIGTERM to their holders: each discards its
    VM and removes its QEMU, mount and network), then remove the hosts, the switch and
    their directories. Returns what it stopped and removed."""
    done: list[str] = []
    hosts = lab_hosts(host)
    holders: list[int] = []
    for h in hosts:
        vms = host_paths(host, h.name).run_root / "vms"
        for rec_path in vms.glob("*/supervisor.json") if vms.is_dir() else []:
            rec = read_json(rec_path) or {}
            pid = rec.get("pid")
            if isinstance(pid, int) and process_alive(pid, rec.get("pid_start")) \
                    and pid not in holders:
                holders.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                done.append(f"stopped {rec.get('vm_id')} on {h.name}")
    for pid, gone in zip(holders, await asyncio.gather(
            *(exited_within(p, STOP_WAIT_S) for p in holders)), strict=True):
        if not gone:
            log.warning("holder %d did not stop within %.0f s", pid, STOP_WAIT_S)
    rd = RunDir(host.net_run_dir)
    async with rd.locked():
        for record in rd.records():
            if record.kind == LAB_KIND:
                await remove_resources(record)
                rd.remove(record.key)
                done.append(f"removed {', '.join(record.namespaces)}")
    for h in hosts:
        paths = host_paths(host, h.name)
        for d in (paths.run_root, paths.state_root):
            shutil.rmtree(d, ignore_errors=True)
    _lab_file(host).unlink(missing_ok=True)
    return done


def describe(host: HostConfig) -> list[dict[str, Any]]:
    """The hosts for ``ferry lab ls``: name, namespace, address, directories."""
    return [{"name": h.name, "namespace": h.namespace, "address": h.address,
             "run_dir": str(host_paths(host, h.name).run_root),
             "state_dir": str(host_paths(host, h.name).state_root),
             "up": netns.exists(h.namespace)} for h in lab_hosts(host)]
