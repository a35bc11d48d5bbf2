"""``ferry image pull`` end to end: a real registry (Debian's docker-registry on loopback),
test images built here from Debian packages with umoci and pushed with skopeo, and every
bad input the issue lists, each a typed error that leaves nothing in the cache.

The unpacked root filesystem is read back with ``debugfs`` (e2fsprogs), without mounting.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.hostconfig import HostConfig
from ferry.oci import (
    ImageIntegrityError,
    ImageNotFoundError,
    ImageTooLargeError,
    OCIError,
    PlatformError,
    PullOptions,
    PullPolicy,
    RegistryError,
    pull,
)
from ferry.oci.pull import images_dir
from ferry.testing.oci_images import LAYERS_EXPECTED, ImageSettings, build_and_push
from ferry.testing.registry import LocalRegistry, answers, local_registry

pytestmark = pytest.mark.e2e

HOST = HostConfig.from_environ(os.environ)  # its cache holds the Debian packages


@dataclass(frozen=True)
class Pushed:
    registry: LocalRegistry
    work: Path
    layers: str
    httpd: str

    def push(self, name: str, repo: str, settings: ImageSettings | None = None) -> str:
        """Push test image ``name`` as ``repo``, with a last layer no other image has."""
        return build_and_push(name, self.registry.address, cache_dir=HOST.cache_root,
                              work_dir=self.work, repo=repo, settings=settings, salt=repo)


@pytest.fixture(scope="module")
def pushed() -> Iterator[Pushed]:
    work = Path(tempfile.mkdtemp(prefix="ferry-oci-"))
    try:
        with local_registry(work / "registry") as reg:
            yield Pushed(
                reg, work,
                layers=build_and_push("layers", reg.address, cache_dir=HOST.cache_root,
                                      work_dir=work),
                httpd=build_and_push("httpd", reg.address, cache_dir=HOST.cache_root,
                                     work_dir=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def manifest_digest(ref: str, *, tls_verify: bool = False) -> str:
    """The digest skopeo reports for ``ref``: an account independent of ferry's."""
    out = subprocess.run(["skopeo", "inspect", f"--tls-verify={str(tls_verify).lower()}",
                          f"docker://{ref}"], capture_output=True, text=True, check=True).stdout
    digest: str = json.loads(out)["Digest"]
    return digest


def debugfs_stat(image: Path, path: str) -> dict[str, int] | None:
    """mode, uid, gid, inode and link count of ``path`` in ext4 ``image``; None if absent."""
    proc = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)],
                          capture_output=True, text=True, check=True)
    if "File not found" in proc.stderr:
        return None
    out = proc.stdout

    def field(pattern: str) -> str:
        m = re.search(pattern, out)
        assert m is not None, f"{pattern!r} not in debugfs output: {out}"
        return m.group(1)

    type_bits = {"regular": 0o100000, "directory": 0o040000, "symlink": 0o120000}
    return {"inode": int(field(r"Inode: (\d+)")),
            "mode": type_bits[field(r"Type: (\w+)")] | int(field(r"Mode:\s+(\d+)"), 8),
            "uid": int(field(r"User:\s+(\d+)")), "gid": int(field(r"Group:\s+(\d+)")),
            "links": int(field(r"Links: (\d+)"))}


def debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                          check=True).stdout


def assert_nothing_cached(cache: Path) -> None:
    root = images_dir(cache)
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert left == [], f"left in the cache: {left}"


def test_registry_starts_answers_and_stops(tmp_path: Path) -> None:
    with local_registry(tmp_path / "reg") as reg:
        assert answers(reg.address)
        address = reg.address
    assert not answers(address)


async def test_pull_unpacks_whiteouts_opaque_dirs_hard_links_owners_modes(
        pushed: Pushed, tmp_path: Path) -> None:
    img = await pull(pushed.layers, cache_dir=tmp_path)
    assert not img.cache_hit
    assert img.digest == manifest_digest(pushed.layers)
    assert img.entry == images_dir(tmp_path) / img.digest.removeprefix("sha256:")
    for path, expected in LAYERS_EXPECTED.items():
        found = debugfs_stat(img.rootfs, path)
        if expected is None:
            assert found is None, f"{path} should be gone"
            continue
        assert found is not None, f"{path} is missing"
        assert (found["mode"], found["uid"], found["gid"]) == expected, path
    a, b = debugfs_stat(img.rootfs, "/links/a"), debugfs_stat(img.rootfs, "/links/b")
    assert a is not None
    assert b is not None
    assert a["inode"] == b["inode"]
    assert a["links"] == 2
    assert debugfs_cat(img.rootfs, "/opaque/new") == b"only this survives\n"
    assert debugfs_cat(img.rootfs, "/data/keep") == b"keep\n"
    recorded = json.loads((img.entry / "image.json").read_text())
    assert recorded["digest"] == img.digest
    assert recorded["config"]["env"] == ["A=1"]

    again = await pull(pushed.layers, cache_dir=tmp_path)
    assert again.cache_hit
    assert again.digest == img.digest
    # Content-addressed: by digest, the cache answers without asking any registry.
    offline = await pull(f"127.0.0.1:1/layers@{img.digest}", cache_dir=tmp_path)
    assert offline.cache_hit
    assert offline.rootfs == img.rootfs


async def test_pull_records_the_image_config(pushed: Pushed, tmp_path: Path) -> None:
    img = await pull(pushed.httpd, cache_dir=tmp_path)
    c = img.config
    assert c.entrypoint == ("/bin/busybox", "httpd", "-f", "-v")
    assert c.cmd == ("-p", "8080", "-h", "/www")
    assert "GREETING=hello" in c.env
    assert (c.workdir, c.user) == ("/www", "65534:65534")
    assert [str(p) for p in c.exposed_ports] == ["8080/tcp"]
    assert debugfs_cat(img.rootfs, "/www/index.html") == b"hello from an OCI image\n"
    by_digest = await pull(f"{pushed.registry.address}/httpd@{img.digest}",
                           cache_dir=tmp_path / "other")
    assert by_digest.digest == img.digest
    assert not by_digest.cache_hit


@pytest.mark.parametrize("suffix", ["/layers:missing", "/nosuchrepo:test",
                                    "/layers@sha256:" + "0" * 64])
async def test_missing_image_tag_or_digest(pushed: Pushed, tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ImageNotFoundError) as err:
        await pull(pushed.registry.address + suffix, cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert "manifest unknown" in str(err.value)
    assert_nothing_cached(tmp_path)


async def test_registry_down_is_a_registry_error(tmp_path: Path) -> None:
    with local_registry(tmp_path / "reg") as reg:
        address = reg.address
    with pytest.raises(OCIError) as err:
        await pull(f"{address}/x:y", cache_dir=tmp_path / "cache")
    assert type(err.value).__name__ == "RegistryError"
    assert "connection refused" in str(err.value)


async def test_manifest_not_matching_its_digest(pushed: Pushed, tmp_path: Path) -> None:
    ref = pushed.push("layers", "tampered-manifest")
    digest = manifest_digest(ref)
    blob = pushed.registry.blob_path(digest)
    data = json.loads(blob.read_bytes())
    data["annotations"] = {"evil": "yes"}  # still a valid manifest, other bytes
    blob.write_bytes(json.dumps(data).encode())
    with pytest.raises(ImageIntegrityError) as err:
        await pull(f"{pushed.registry.address}/tampered-manifest@{digest}", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert_nothing_cached(tmp_path)


def raw_manifest(ref: str) -> dict[str, Any]:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, check=True).stdout
    data: dict[str, Any] = json.loads(raw)
    return data


def _salt_layer_blob(pushed: Pushed, ref: str) -> Path:
    """Where the registry keeps the last (salt) layer of ``ref``: shared with no other image."""
    return pushed.registry.blob_path(raw_manifest(ref)["layers"][-1]["digest"])


async def test_corrupt_layer(pushed: Pushed, tmp_path: Path) -> None:
    ref = pushed.push("httpd", "corrupt")
    blob = _salt_layer_blob(pushed, ref)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageIntegrityError) as err:
        await pull(ref, cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert "digest" in str(err.value).lower()
    assert_nothing_cached(tmp_path)


async def test_truncated_layer(pushed: Pushed, tmp_path: Path) -> None:
    ref = pushed.push("httpd", "truncated")
    blob = _salt_layer_blob(pushed, ref)
    with blob.open("r+b") as f:
        f.truncate(blob.stat().st_size // 2)
    with pytest.raises(ImageIntegrityError) as err:
        await pull(ref, cache_dir=tmp_path)
    # The registry serves the half it has; skopeo's digest check refuses it.
    assert "\n" not in str(err.value)
    assert "digest did not match" in str(err.value).lower()
    assert_nothing_cached(tmp_path)


async def test_wrong_architecture(pushed: Pushed, tmp_path: Path) -> None:
    ref = pushed.push("layers", "arm", ImageSettings(architecture="arm64"))
    with pytest.raises(PlatformError) as err:
        await pull(ref, cache_dir=tmp_path)
    assert "linux/arm64, not linux/amd64" in str(err.value)
    assert_nothing_cached(tmp_path)


async def test_layer_over_the_compressed_size_limit(pushed: Pushed, tmp_path: Path) -> None:
    with pytest.raises(ImageTooLargeError) as err:
        await pull(pushed.httpd, cache_dir=tmp_path, options=PullOptions(max_layer_bytes=4096))
    assert "compressed, over the limit of 4096" in str(err.value)
    assert_nothing_cached(tmp_path)


async def test_layer_expanding_over_the_limit(pushed: Pushed, tmp_path: Path) -> None:
    compressed = raw_manifest(pushed.httpd)["layers"][0]["size"]
    limit = compressed + 1  # passes the manifest check; busybox expands ~2x
    with pytest.raises(ImageTooLargeError) as err:
        await pull(pushed.httpd, cache_dir=tmp_path, options=PullOptions(max_layer_bytes=limit))
    assert f"expands to over {limit} bytes" in str(err.value)
    assert_nothing_cached(tmp_path)


async def test_pull_over_verified_https_with_docker_config_credentials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry as on the internet: HTTPS with a certificate to verify, basic auth. skopeo
    finds the credentials in ~/.docker/config.json and the CA in $SSL_CERT_FILE."""
    creds = ("ferry", "s3cret-pass")
    with local_registry(tmp_path / "reg", tls=True, credentials=creds) as reg:
        assert reg.ca_path is not None
        ref = build_and_push("layers", reg.address, cache_dir=HOST.cache_root,
                             work_dir=tmp_path, credentials=creds)
        home = tmp_path / "home"
        (home / ".docker").mkdir(parents=True)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))  # no auth.json there
        monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
        verified = PullOptions(tls_verify=True)

        # No CA to verify the certificate with: refused, nothing cached.
        with pytest.raises(OCIError) as err:
            await pull(ref, cache_dir=tmp_path / "c1", options=verified)
        assert type(err.value).__name__ == "RegistryError"
        assert "certificate" in str(err.value)
        assert_nothing_cached(tmp_path / "c1")

        monkeypatch.setenv("SSL_CERT_FILE", str(reg.ca_path))
        # Verified now, but no credentials: refused by the registry.
        with pytest.raises(OCIError) as err:
            await pull(ref, cache_dir=tmp_path / "c2", options=verified)
        assert type(err.value).__name__ == "RegistryError"
        assert "unauthorized" in str(err.value).lower()
        assert "\n" not in str(err.value)
        assert_nothing_cached(tmp_path / "c2")

        token = base64.b64encode(":".join(creds).encode()).decode()
        (home / ".docker" / "config.json").write_text(
            json.dumps({"auths": {reg.address: {"auth": token}}}))
        img = await pull(ref, cache_dir=tmp_path / "c3", options=verified)
        assert img.digest == manifest_digest(ref, tls_verify=True)
        assert debugfs_cat(img.rootfs, "/data/keep") == b"keep\n"



async def test_policy_missing_uses_a_tag_pulled_before_without_the_registry(
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with local_registry(tmp_path / "reg") as reg:
        ref = build_and_push("layers", reg.address, cache_dir=HOST.cache_root,
                             work_dir=tmp_path)
        first = await pull(ref, cache_dir=cache)
    missing = PullOptions(policy=PullPolicy.MISSING)
    # The registry is gone: the tag this host pulled resolves from its own record ...
    again = await pull(ref, cache_dir=cache, options=missing)
    assert again.cache_hit
    assert again.digest == first.digest
    # ... while "always" asks the registry, and a tag never pulled here must be asked for.
    with pytest.raises(RegistryError):
        await pull(ref, cache_dir=cache)
    with pytest.raises(RegistryError):
        await pull(ref.replace(":test", ":other"), cache_dir=cache, options=missing)
