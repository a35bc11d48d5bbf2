"""An OCI image's VM gets what a blueprint's gets: ``ferry vm snapshot oci://REF --package``
makes a signed package, which verifies, resumes, suspends and continues, and live-migrates
between two namespace hosts (:class:`ferry.testing.site.Site`, the CLI in each host).

The image is the ``redis`` test image, built from Debian packages and pushed to a local
registry; the package is made once for the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferry.hostconfig import HostConfig
from ferry.testing.oci_images import build_and_push
from ferry.testing.packages import Signer
from ferry.testing.registry import local_registry
from ferry.testing.site import Site, scratch_root, site_on_hosts

pytestmark = pytest.mark.e2e

FERRY = [sys.executable, "-m", "ferry.cli.main"]
SHARED = HostConfig.from_environ(os.environ).cache_root
HOSTS = ("oca", "ocb")  # this module's own: VM networks are named after hosts and VMs
MIGRATE_PORT = 7531


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with scratch_root("focp-") as path:
        yield path


@pytest.fixture(scope="module")
def image_package(root: Path, signer: Signer) -> Path:
    """The redis image, snapshotted once ready and signed, as a user makes it."""
    cache = root / "cache"
    cache.mkdir()
    for shared in ("debs", "agent"):  # packages, kernel and agent from the host's cache
        (SHARED / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(SHARED / shared)
    env = {**os.environ, **signer.env, "FERRY_CACHE_DIR": str(cache),
           "FERRY_RUN_DIR": str(root / "snap-run"), "FERRY_STATE_DIR": str(root / "snap-state")}
    package = root / "redis-image.ferry"
    if not signer.key.exists():  # as Signer.package does: one key for the session
        subprocess.run([*FERRY, "key", "create", "--trust"], env=env, capture_output=True,
                       check=True, timeout=60)
    with local_registry(root / "registry") as reg:
        ref = build_and_push("redis", reg.address, cache_dir=SHARED, work_dir=root)
        proc = subprocess.run([*FERRY, "vm", "snapshot", f"oci://{ref}", "-o",
                               str(root / "pkgdir"), "--package", str(package), "--prepare",
                               "chroot /oci redis-cli set origin snapshot"],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return package


@pytest.fixture
async def site(root: Path, signer: Signer) -> AsyncIterator[Site]:
    async with site_on_hosts(HOSTS, root, signer.env, switch_tag="oc") as s:
        yield s


async def redis_cli(site: Site, host: str, vm: str, *args: str) -> str:
    """``redis-cli ARGS`` inside the container of ``vm`` on ``host``."""
    out = await site.ferry(host, "vm", "exec", vm, "--", "chroot", "/oci", "redis-cli", *args)
    return out.strip()


async def test_image_package_verifies_resumes_suspends_and_continues(
        site: Site, image_package: Path) -> None:
    verified = await site.ferry_json("oca", "package", "verify", str(image_package))
    assert verified["files"] == 8  # manifest, memory, state, disk, kernel, initramfs, 2 hashes
    await site.vm_run("oca", "oc-r1", image_package)
    assert await redis_cli(site, "oca", "oc-r1", "get", "origin") == "snapshot"
    await redis_cli(site, "oca", "oc-r1", "set", "later", "kept")
    await site.ferry("oca", "vm", "stop", "oc-r1", "--suspend")
    await site.ferry("oca", "vm", "run", "--detach", "--name", "oc-r1")
    assert await redis_cli(site, "oca", "oc-r1", "get", "later") == "kept"


async def test_image_vm_live_migrates(site: Site, image_package: Path) -> None:
    await site.vm_run("oca", "oc-m1", image_package)
    await redis_cli(site, "oca", "oc-m1", "set", "moved", "yes")
    reply = await site.hop("oc-m1", "oca", "ocb", MIGRATE_PORT)
    assert reply["summary"]["outcome"] == "completed"
    assert await redis_cli(site, "ocb", "oc-m1", "get", "moved") == "yes"
    assert await redis_cli(site, "ocb", "oc-m1", "get", "origin") == "snapshot"
    listed = await site.ferry_json("oca", "vm", "list")
    assert [v["vm_id"] for v in listed] == []


def test_package_push_and_pull_through_a_registry(root: Path, signer: Signer,
                                                   image_package: Path) -> None:
    env = {**os.environ, **signer.env}

    def ferry(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FERRY, *args], env=env, capture_output=True, text=True,
                              timeout=300, check=False)

    out = root / "pulled"
    out.mkdir()
    untrusting = root / "empty-trust"
    untrusting.mkdir()
    with local_registry(root / "pkg-registry") as reg:
        pushed = ferry("package", "push", str(image_package), f"oci://{reg.address}/vms/redis:1")
        assert pushed.returncode == 0, pushed.stderr
        again = ferry("package", "push", str(image_package), f"oci://{reg.address}/vms/redis:1")
        assert again.returncode == 1
        assert "exists in the registry" in again.stderr
        replaced = ferry("package", "push", str(image_package),
                         f"oci://{reg.address}/vms/redis:1", "--overwrite")
        assert replaced.returncode == 0, replaced.stderr
        pulled = ferry("package", "pull", f"oci://{reg.address}/vms/redis:1",
                       str(out / "redis.ferry"), "--json")
        assert pulled.returncode == 0, pulled.stderr
        assert (out / "redis.ferry").read_bytes() == image_package.read_bytes()
        assert json.loads(pulled.stdout)["files"] == 8

        # Signed by a key this host does not trust: refused, nothing under the name.
        refused = ferry("package", "pull", f"oci://{reg.address}/vms/redis:1",
                        str(out / "untrusted.ferry"), "--trust", str(untrusting))
        assert refused.returncode == 3
        assert "does not trust" in refused.stderr.strip().splitlines()[-1]

        # An image that is not a package.
        image = build_and_push("layers", reg.address, cache_dir=SHARED, work_dir=root)
        other = ferry("package", "pull", f"oci://{image}", str(out / "image.ferry"))
        assert other.returncode == 1
        assert "not a ferry package" in other.stderr

        # The package's layer damaged in the registry: skopeo's digest check refuses it.
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false",
             f"docker://{reg.address}/vms/redis:1"], capture_output=True, check=True).stdout)
        blob = reg.blob_path(manifest["layers"][0]["digest"])
        with blob.open("r+b") as f:
            f.seek(blob.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        damaged = ferry("package", "pull", f"oci://{reg.address}/vms/redis:1",
                        str(out / "damaged.ferry"))
        assert damaged.returncode == 3
        assert "digest" in damaged.stderr.lower()
    assert sorted(p.name for p in out.iterdir()) == ["redis.ferry"]  # no temp files left
