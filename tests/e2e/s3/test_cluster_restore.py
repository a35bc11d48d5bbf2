"""A node dies without notice; its mirrored VM comes back on another node, from S3.

Two daemons joined to one etcd (namespace hosts, :func:`~ferry.testing.cluster.
cluster_on_hosts`), a real SeaweedFS reached from inside each host at the address
every process uses (:func:`~ferry.testing.relay.relay_into`). A VM runs on node 1
with ``mirror`` (``POST /v1/vms``), a file is written in it and a checkpoint taken
after it; then every process of node 1 is SIGKILLed (daemon, holder, QEMU: the
node is gone, not stopped). Node 2 marks it dead when its lease expires and
restores the VM from the mirror's last checkpoint on itself: the file is there,
the placement names node 2 and a new mirror prefix, and the operation, the
events and the metrics say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ferry.testing.cluster import all_alive, cluster_on_hosts, until
from ferry.testing.packages import Signer
from ferry.testing.relay import relay_into
from ferry.testing.s3 import SeaweedFS
from ferry.testing.site import scratch_root

from ..conftest import MINIMAL_MARK

pytestmark = pytest.mark.e2e

NODES = ["rst1", "rst2"]
VM = "rst-v1"
WRITTEN = "written-before-the-crash"


def _kill_everything_in(namespace: str) -> list[int]:
    """SIGKILL every process in ``namespace`` (the node dies: nothing cleans up)."""
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                         check=True).stdout
    pids = [int(p) for p in out.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


async def test_a_dead_nodes_mirrored_vm_is_restored_on_another_node(
        signer: Signer, minimal_package: Path, seaweedfs: SeaweedFS) -> None:
    bucket = f"t-{secrets.token_hex(6)}"
    await asyncio.to_thread(seaweedfs.store, bucket)
    port = urlsplit(seaweedfs.endpoint_url).port
    assert port is not None
    url = f"s3://{bucket}/{VM}"
    with scratch_root("frs-") as root:
        async with cluster_on_hosts(NODES, root, {**signer.env, **seaweedfs.env()},
                                    switch_tag="rst", lease_ttl_s=3) as c, \
                contextlib.AsyncExitStack() as relays:
            for h in NODES:
                await relays.enter_async_context(relay_into(c.site.hosts[h].namespace, port))
            await until("both nodes alive", lambda: all_alive(c, "rst2"))
            await c.call("rst2", "POST", "/v1/node/cordon")  # the VM lands on rst1
            op = await c.call("rst1", "POST", "/v1/vms", {
                "package": str(minimal_package), "name": VM,
                "mirror": {"url": url, "interval_s": 1.0}})
            done = await c.wait("rst1", op)
            assert done["state"] == "succeeded", done
            assert done["result"]["mirror"]["url"] == url
            await c.call("rst2", "POST", "/v1/node/uncordon")

            ran = await c.call("rst1", "POST", f"/v1/vms/{VM}/exec", {
                "argv": ["sh", "-c", f"echo {WRITTEN} > /root/after && sync"]})
            assert ran["exit_code"] == 0, ran
            written_at = time.time()

            async def checkpoint_after_the_write() -> Any:
                mirror = (await c.call("rst1", "GET", f"/v1/vms/{VM}"))["mirror"]
                return ((mirror or {}).get("last_checkpoint_unix_s") or 0) > written_at

            await until("a checkpoint after the write", checkpoint_after_the_write)

            async def placed(node: str) -> Any:
                p = (await c.call("rst2", "GET", "/v1/cluster"))["vms"].get(VM) or {}
                return p if p.get("node") == node and p.get("status") == "running" else None

            before = await until("the placement naming rst1", lambda: placed("rst1"))
            assert before["mirror"]["url"] == url

            # rst1 dies: every process in its namespace, at once.
            assert _kill_everything_in(c.site.hosts["rst1"].namespace)
            killed_at = time.monotonic()
            try:
                after = await until("the VM restored on rst2", lambda: placed("rst2"),
                                    timeout_s=120)
            except TimeoutError:
                ops = await c.call("rst2", "GET", "/v1/operations")
                view = await c.call("rst2", "GET", "/v1/cluster")
                pytest.fail(f"not restored: operations {ops}, cluster {view}")
            print(f"node killed -> VM running on rst2: {time.monotonic() - killed_at:.1f} s "
                  "(lease 3 s)")
            assert after["mirror"]["url"].startswith(f"{url}-r")  # mirrored on, elsewhere

            [vm] = [v for v in await c.call("rst2", "GET", "/v1/vms") if v["vm_id"] == VM]
            assert vm["status"] == "running"
            assert vm["mirror_to"]["url"] == after["mirror"]["url"]
            for path, want in (("/root/after", WRITTEN), ("/root/mark", MINIMAL_MARK)):
                read = await c.call("rst2", "POST", f"/v1/vms/{VM}/exec", {"argv": ["cat", path]})
                assert read["stdout"].strip() == want, read

            [restore] = [o for o in await c.call("rst2", "GET", "/v1/operations")
                         if o["kind"] == "restore-dead"]
            restore = await c.wait("rst2", restore)
            assert restore["state"] == "succeeded", restore
            result = restore["result"]
            assert result["node"] == "rst1"
            [restored] = result["restored"]
            assert (restored["vm"], restored["to"], restored["from"]) == (VM, "rst2", url)
            assert restored["checkpoint_age_s"] is not None
            assert (result["lost"], result["skipped"]) == ([], [])
            view = await c.call("rst2", "GET", "/v1/cluster")
            [rst1] = [n for n in view["nodes"] if n["name"] == "rst1"]
            assert rst1["state"]["status"] == "dead"
            assert rst1["state"]["vms"] == [VM]
            _, raw = await asyncio.to_thread(c.api("rst2").raw, "GET", "/metrics")
            assert 'ferry_cluster_restored_vms_total{outcome="restored"} 1.0' in raw.decode()
