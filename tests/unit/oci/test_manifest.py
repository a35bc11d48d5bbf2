"""Manifests, indexes and configs: what is accepted, and each refusal's type."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from ferry.oci import ImageIntegrityError, ImageTooLargeError, ManifestError, PlatformError
from ferry.oci import manifest as mf
from ferry.oci.pull import verify_layer
from ferry.oci.tools import skopeo_error

REF = "reg.example/app:1"
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest(layers: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"schemaVersion": 2,
                       "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": digest(b"c"), "size": 1},
                       "layers": layers, **extra}).encode()


def layer(size: int = 10, media: str = GZ) -> dict[str, Any]:
    return {"mediaType": media, "digest": digest(str(size).encode()), "size": size}


def test_manifest_parses_and_is_named_by_its_digest() -> None:
    raw = manifest([layer(10), layer(20)])
    m = mf.parse_manifest(raw, REF, max_layer_bytes=100)
    assert m.digest == digest(raw)
    assert [d.size_bytes for d in m.layers] == [10, 20]
    assert not mf.is_index(raw, REF)


@pytest.mark.parametrize(("raw", "error"), [
    (b"{not json", ManifestError),
    (b"[]", ManifestError),
    (manifest([]), ManifestError),
    (manifest([layer(media="application/vnd.oci.image.layer.nondistributable.v1.tar")]),
     ManifestError),
    (manifest([{"mediaType": GZ, "digest": "sha256:short", "size": 1}]), ManifestError),
    (manifest([{"mediaType": GZ, "digest": digest(b"x"), "size": -1}]), ManifestError),
    (manifest([layer(101)]), ImageTooLargeError),
    (manifest([layer(1)] * (mf.MAX_LAYERS + 1)), ImageTooLargeError),
    (b" " * (mf.MAX_MANIFEST_BYTES + 1), ImageTooLargeError),
])
def test_bad_manifests(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as err:
        mf.parse_manifest(raw, REF, max_layer_bytes=100)
    assert str(err.value).startswith(f"image {REF}: ")
    assert "\n" not in str(err.value)


def index(*platforms: tuple[str, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                      "digest": digest(f"{o}/{a}".encode()), "size": 1,
                                      "platform": {"os": o, "architecture": a}}
                                     for o, a in platforms]}).encode()


def test_index_selects_linux_amd64() -> None:
    raw = index(("linux", "arm64"), ("linux", "amd64"), ("windows", "amd64"))
    assert mf.is_index(raw, REF)
    assert mf.select_platform(raw, REF) == digest(b"linux/amd64")


def test_index_without_linux_amd64() -> None:
    with pytest.raises(PlatformError) as err:
        mf.select_platform(index(("linux", "arm64"), ("linux", "s390x")), REF)
    assert "linux/arm64, linux/s390x" in str(err.value)


def config(**fields: Any) -> bytes:
    body = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
            "config": {}}
    body.update(fields)
    return json.dumps(body).encode()


def test_config_fields() -> None:
    raw = config(config={"Entrypoint": ["/e"], "Cmd": ["a", "b"], "Env": ["X=1"],
                         "WorkingDir": "/w", "User": "1:2",
                         "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080": {}}})
    c = mf.parse_config(raw, REF, expected_digest=digest(raw))
    assert (c.entrypoint, c.cmd, c.env, c.workdir, c.user) == (("/e",), ("a", "b"), ("X=1",),
                                                               "/w", "1:2")
    assert [str(p) for p in c.exposed_ports] == ["53/udp", "80/tcp", "8080/tcp"]
    assert mf.ImageConfig.from_json(c.to_json()) == c


def test_config_of_another_platform() -> None:
    raw = config(architecture="arm64")
    with pytest.raises(PlatformError) as err:
        mf.parse_config(raw, REF, expected_digest=digest(raw))
    assert "built for linux/arm64, not linux/amd64" in str(err.value)


def test_config_not_matching_its_digest() -> None:
    with pytest.raises(ImageIntegrityError):
        mf.parse_config(config(), REF, expected_digest=digest(b"other"))


@pytest.mark.parametrize("inner", [{"Cmd": "not a list"}, {"Env": [1]}, {"User": 0},
                                   {"ExposedPorts": {"99999/tcp": {}}},
                                   {"ExposedPorts": {"80/xyz": {}}}])
def test_config_malformed(inner: dict[str, Any]) -> None:
    raw = config(config=inner)
    with pytest.raises(ManifestError):
        mf.parse_config(raw, REF, expected_digest=digest(raw))


# --- one layer blob, checked after skopeo's copy ----------------------------------

def write_layer(tmp_path: Path, plain: bytes) -> tuple[Path, mf.Descriptor, str]:
    blob = gzip.compress(plain)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    return path, mf.Descriptor(GZ, digest(blob), len(blob)), digest(plain)


def test_layer_verifies(tmp_path: Path) -> None:
    path, desc, diff_id = write_layer(tmp_path, b"x" * 5000)
    verify_layer(path, desc, diff_id, "layer 0", REF, max_layer_bytes=5000)


def test_layer_expanding_past_the_limit(tmp_path: Path) -> None:
    path, desc, diff_id = write_layer(tmp_path, b"\0" * 100_000)  # ~100 bytes compressed
    with pytest.raises(ImageTooLargeError, match="expands to over 4096 bytes"):
        verify_layer(path, desc, diff_id, "layer 0", REF, max_layer_bytes=4096)


def test_layer_with_bad_gzip_but_matching_digest(tmp_path: Path) -> None:
    blob = gzip.compress(b"y" * 1000)
    blob = blob[:10] + bytes(b ^ 0x55 for b in blob[10:20]) + blob[20:]
    path = tmp_path / "blob"
    path.write_bytes(blob)
    desc = mf.Descriptor(GZ, digest(blob), len(blob))
    with pytest.raises(ImageIntegrityError, match="corrupt or truncated"):
        verify_layer(path, desc, digest(b"y" * 1000), "layer 0", REF, max_layer_bytes=10**6)


def test_layer_truncated(tmp_path: Path) -> None:
    path, desc, diff_id = write_layer(tmp_path, bytes(range(256)) * 100)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ImageIntegrityError):
        verify_layer(path, desc, diff_id, "layer 0", REF, max_layer_bytes=10**6)


def test_layer_with_wrong_diff_id(tmp_path: Path) -> None:
    path, desc, _ = write_layer(tmp_path, b"z" * 100)
    with pytest.raises(ImageIntegrityError, match="diff_id"):
        verify_layer(path, desc, digest(b"other"), "layer 0", REF, max_layer_bytes=10**6)


# --- skopeo's failures, typed ----------------------------------------------------

@pytest.mark.parametrize(("stderr", "error", "message"), [
    ('time="t" level=fatal msg="Error parsing image name \\"docker://r/x:y\\": reading manifest '
     'y in r/x: manifest unknown: manifest unknown"', "ImageNotFoundError",
     "reading manifest y in r/x: manifest unknown: manifest unknown"),
    ('time="t" level=fatal msg="writing blob: Digest did not match, expected sha256:a, got '
     'sha256:b"', "ImageIntegrityError", "writing blob: Digest did not match, expected sha256:a, "
     "got sha256:b"),
    ('time="t" level=fatal msg="pinging container registry r: connect: connection refused"',
     "RegistryError", "pinging container registry r: connect: connection refused"),
    ("plain text\nover lines", "RegistryError", "plain text over lines"),
])
def test_skopeo_errors(stderr: str, error: str, message: str) -> None:
    err = skopeo_error(stderr, REF)
    assert type(err).__name__ == error
    assert str(err) == f"image {REF}: {message}"
