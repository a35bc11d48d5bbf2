"""``ferry package push`` and ``pull`` as real processes against a real SeaweedFS,
configured the way users configure any S3 tool (AWS_* environment variables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.cli.exitcodes import ExitCode
from ferry.s3 import ObjectStore
from ferry.testing.s3 import SeaweedFS

pytestmark = pytest.mark.e2e

FERRY = (sys.executable, "-m", "ferry.cli.main")


class Host:
    """A ferry CLI environment of its own: trust list, signing key, S3 credentials."""

    def __init__(self, root: Path, s3: SeaweedFS, *, secret: str | None = None) -> None:
        self.root = root
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FERRY_"))},
            "FERRY_TRUST_DIR": str(root / "trusted"),
            "FERRY_SIGNING_KEY": str(root / "keys" / "signing.key"),
            "FERRY_RUN_DIR": str(root / "run"), "FERRY_STATE_DIR": str(root / "state"),
            "FERRY_CACHE_DIR": str(root / "cache"),
            "AWS_ENDPOINT_URL_S3": s3.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": s3.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret or s3.credentials.secret_access_key,
            "AWS_CONFIG_FILE": str(root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
        }

    def ferry(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FERRY, *args, "--no-progress"], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=120, check=False)

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.ferry(*args)
        assert proc.returncode == 0, proc.stderr
        return proc


@pytest.fixture
def signed(tmp_path: Path, seaweedfs: SeaweedFS) -> tuple[Host, Path]:
    """A host with a trusted key, and a small signed package it made."""
    host = Host(tmp_path / "a", seaweedfs)
    host.root.mkdir()
    host.ok("key", "create", "--trust")
    content = host.root / "content"
    content.mkdir()
    (content / "disk.img").write_bytes(os.urandom(3 << 20))
    (content / "notes.txt").write_text("hello from the package\n")
    package = host.root / "vm.ferry"
    host.ok("package", "create", str(content), str(package))
    return host, package


def fresh_host(tmp_path: Path, s3: SeaweedFS, trusting: Host | None, name: str = "b",
               **kwargs: str) -> Host:
    host = Host(tmp_path / name, s3, **kwargs)
    (host.root / "trusted").mkdir(parents=True)
    if trusting is not None:
        pub = Path(trusting.env["FERRY_SIGNING_KEY"] + ".pub")
        host.ok("key", "trust", str(pub))
    return host


def test_push_then_pull_on_another_host(signed: tuple[Host, Path], store: ObjectStore,
                                        seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    host, package = signed
    url = f"s3://{store.bucket}/packages/vm.ferry"
    pushed = json.loads(host.ok("package", "push", str(package), url, "--json").stdout)
    assert pushed["size_bytes"] == package.stat().st_size
    refused = host.ferry("package", "push", str(package), url)  # no silent overwrite
    assert refused.returncode == ExitCode.ERROR
    assert "already exists" in refused.stderr
    other = fresh_host(tmp_path, seaweedfs, trusting=host)
    pulled = json.loads(other.ok("package", "pull", url, "--json").stdout)
    assert pulled["key_id"]
    assert pulled["files"] >= 2
    assert (other.root / "vm.ferry").read_bytes() == package.read_bytes()
    other.ok("package", "verify", "vm.ferry")
    into = other.root / "elsewhere"
    into.mkdir()
    other.env["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9"  # nothing there: the option wins
    other.ok("package", "pull", url, str(into), "--endpoint-url", seaweedfs.endpoint_url)
    assert (into / "vm.ferry").read_bytes() == package.read_bytes()  # the key's name in it
    again = other.ferry("package", "pull", url, "--endpoint-url", seaweedfs.endpoint_url)
    assert again.returncode == ExitCode.ERROR
    assert "already exists" in again.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_package_is_refused_and_nothing_lands(
        signed: tuple[Host, Path], store: ObjectStore, seaweedfs: SeaweedFS,
        tmp_path: Path, damage: str) -> None:
    host, package = signed
    data = bytearray(package.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        del data[len(data) * 2 // 3:]
    store.put("vm.ferry", bytes(data))
    other = fresh_host(tmp_path, seaweedfs, trusting=host)
    proc = other.ferry("package", "pull", f"s3://{store.bucket}/vm.ferry")
    assert proc.returncode == ExitCode.INTEGRITY, proc.stderr
    assert proc.stderr.startswith("ferry: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in other.root.iterdir()) == ["trusted"]  # nothing landed


def test_package_from_an_untrusted_key_is_refused(signed: tuple[Host, Path],
                                                  store: ObjectStore, seaweedfs: SeaweedFS,
                                                  tmp_path: Path) -> None:
    host, package = signed
    host.ok("package", "push", str(package), f"s3://{store.bucket}/vm.ferry")
    stranger = fresh_host(tmp_path, seaweedfs, trusting=None)
    proc = stranger.ferry("package", "pull", f"s3://{store.bucket}/vm.ferry")
    assert proc.returncode == ExitCode.INTEGRITY
    assert "key" in proc.stderr
    assert not (stranger.root / "vm.ferry").exists()


def test_wrong_credentials_and_missing_keys(signed: tuple[Host, Path], store: ObjectStore,
                                            seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    host, package = signed
    wrong = fresh_host(tmp_path, seaweedfs, trusting=host, name="w", secret="not-the-secret")
    proc = wrong.ferry("package", "push", str(package), f"s3://{store.bucket}/x.ferry")
    assert proc.returncode == ExitCode.PEER
    assert seaweedfs.endpoint_url in proc.stderr
    assert "credentials" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    missing = host.ferry("package", "pull", f"s3://{store.bucket}/nothing.ferry")
    assert missing.returncode == ExitCode.ERROR
    assert "no such key" in missing.stderr
    bad_url = host.ferry("package", "pull", "s3:/not-a-url")  # not s3://
    assert bad_url.returncode == ExitCode.USAGE
