"""Live migration over emulated long, slow and lossy links, on the user path.

Real QEMU (TCG), namespace hosts and the ``ferry`` CLI (:class:`ferry.testing.site.Site`),
with the link between the two hosts emulated (:meth:`ferry.testing.hosts.HostSet.set_link`,
docs/wan.md); the Redis client writes from a third host whose path is not slowed. One
migration per link: a Redis VM moves with every acknowledged write kept, over
100 ms / 1 Gbit/s and over 20 ms / 100 Mbit/s with 1% loss. Also: the VM link's sockets
are sized for the link they measured (the fixed 1 MiB buffers capped one connection at
~114 Mbit/s of a 1 Gbit/s, 100 ms link).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferry.testing.linkprobe import tcp_pair
from ferry.testing.packages import Signer
from ferry.testing.redis_hops import run_redis_hops
from ferry.testing.site import Site, downtime, scratch_root, site_on_hosts
from ferry.transport.tuning import (
    MAX_LINK_BUFFER_BYTES,
    SOCKET_BUFFER_BYTES,
    TcpTuning,
    link_buffer_bytes,
    measured_rtt_s,
)

from .test_live_migration import assert_hop

pytestmark = pytest.mark.e2e

# Names of this module only (VM networks are named after the VM; other e2e runs may
# share the machine).
HOSTS = ("wna", "wnb", "wnc")
MIGRATE_PORT = 7531


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with scratch_root("fwn-") as path:
        yield path


@pytest.fixture
async def site(root: Path, signer: Signer) -> AsyncIterator[Site]:
    async with site_on_hosts(HOSTS, root, signer.env, switch_tag="wn") as s:
        yield s


async def test_link_fitted_sockets_size_their_buffers_from_the_measured_rtt(site: Site) -> None:
    """Over 100 ms the buffers of a VM link's sockets (``TcpTuning(fit_to_link=True)``, as
    :class:`ferry.live.access.Access` uses) are raised to what the RTT the handshake
    measured needs (capped), on both ends; over the unslowed path, the 1 MiB floor."""
    await site.hosts.set_link("wna", "wnb", rtt_ms=100, mbit=1000)
    tuning = TcpTuning(dead_peer_s=None, fit_to_link=True)
    for dst, want in (("wnb", MAX_LINK_BUFFER_BYTES), ("wnc", SOCKET_BUFFER_BYTES)):
        client, server = await tcp_pair(site.hosts, "wna", dst, tuning=tuning)
        with client, server:
            for end in (client, server):
                rtt_s = measured_rtt_s(end)
                assert rtt_s is not None
                assert link_buffer_bytes(rtt_s) == want
                # The kernel reports twice what was set (its bookkeeping overhead).
                assert end.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * want
                assert end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * want


@pytest.mark.parametrize(("rtt_ms", "mbit", "loss"), [(100, 1000, 0.0), (20, 100, 0.01)],
                         ids=["100ms-1gbit", "20ms-100mbit-1pct-loss"])
async def test_redis_migrates_over_a_long_link_losing_nothing(
        site: Site, redis_package: Path, rtt_ms: float, mbit: float, loss: float) -> None:
    await site.hosts.set_link("wna", "wnb", rtt_ms=rtt_ms, mbit=mbit, loss=loss)
    hops = await run_redis_hops(site, redis_package, ["wna", "wnb"], vm="wn-r1",
                                migrate_port=MIGRATE_PORT, writes_between=30,
                                client_host="wnc")
    assert hops.lost == []
    [hop] = hops.hops
    assert_hop(hop.reply, hop.command_s)
    assert hop.writes_during >= 30  # writes continued on the new host
    stats = await site.hosts.link_stats()
    # The migration crossed the emulated link (and, lossy, lost frames on it).
    assert stats["wna>wnb"]["frames"] > 0
    if loss:
        assert stats["wna>wnb"]["lost"] > 0
    d = downtime(hop.summary)
    print(f"{rtt_ms} ms, {mbit} Mbit/s, loss {loss}: downtime {d.corrected_ms} ms "
          f"+-{d.uncertainty_ms} {d.steps_ms}, total {hop.summary.total_s} s, "
          f"RAM via {hop.reply['source']['ram_path']}")
