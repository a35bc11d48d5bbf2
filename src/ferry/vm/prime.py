"""Priming a warm VM: it runs once before it is claimed, then waits paused.

A warm VM (:func:`ferry.vm.runner.run_vm` with ``claim``) that only waits with QEMU at
``-incoming defer`` still pays, after the claim, for the state load and for the guest's
first steps under TCG: every code path the first request takes (virtio-net, the TCP
stack, the application's accept) is translated on first use. Primed, the warm VM loads
its state, continues, answers its agent, and accepts one TCP connection on each guest
port the package was last published on (opened and closed from inside the VM's network
namespace; no byte is sent), then pauses. The claim then only continues it.

What the guest sees is what any resumed VM may see: it ran idle for a moment after the
resume, and a client connected and left. The clock is set after the claim (the agent's
after-resume call), as for every resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.guest.agent import AgentClient, connect_agent
from ferry.net import VMNetwork
from ferry.net.netns import socket_in_netns
from ferry.qemu import DeviceStateStats, QemuVM

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""How long one probe connection to the guest may take (a port nothing listens on
answers at once with a reset)."""
MAX_PRIME_PORTS = 16
"""Guest ports probed at most (the first ones published)."""


@dataclass(frozen=True, slots=True)
class Primed:
    """A warm VM that ran and paused: its state load, its agent, what it answered."""

    loaded: DeviceStateStats
    agent: AgentClient
    accepted: tuple[int, ...]
    """The guest ports that accepted the probe connection."""
    seconds: float


async def prime(qemu: QemuVM, state_file: Path, net: VMNetwork,
                stack: contextlib.AsyncExitStack, *, guest_ports: Sequence[int],
                agent_timeout_s: float) -> Primed:
    """Load ``state_file``, continue, wait for the agent (kept open on ``stack``), probe
    ``guest_ports``, and pause the guest again."""
    started = time.monotonic()
    loaded = await qemu.load_device_state(state_file)
    await qemu.resume()
    try:
        agent = await stack.enter_async_context(
            connect_agent(qemu.agent_socket, connect_timeout_s=agent_timeout_s))
        await agent.ping(timeout_s=agent_timeout_s)
        ports = list(dict.fromkeys(guest_ports))[:MAX_PRIME_PORTS]
        accepted = tuple([p for p in ports if await _probe(net, p)])
    finally:
        await qemu.pause()
    seconds = time.monotonic() - started
    log.info("warm vm primed in %.0f ms; guest ports that accepted a connection: %s",
             seconds * 1e3, list(accepted) or "none")
    return Primed(loaded, agent, accepted, seconds)


async def _probe(net: VMNetwork, port: int) -> bool:
    """Connect to the guest's ``port`` from the VM's namespace and close at once."""
    sock = await socket_in_netns(net.namespace, socket.AF_INET, socket.SOCK_STREAM)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await asyncio.get_running_loop().sock_connect(sock, (net.guest_ip, port))
        return True
    except (OSError, TimeoutError) as exc:
        log.info("warm vm: guest port %d took no connection (%s)", port, exc)
        return False
    finally:
        sock.close()
