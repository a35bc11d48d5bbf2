"""The SeaweedFS test service: it answers signed requests only, survives a restart with
its data, and leaves no process or directory behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import boto3
import botocore
import botocore.config
import pytest

from ferry.s3 import (
    ObjectStore,
    S3Config,
    S3Credentials,
    S3Device,
    S3DeviceError,
    S3UnreachableError,
)
from ferry.testing.s3 import SeaweedFS

pytestmark = pytest.mark.e2e


def test_restart_keeps_data_and_exit_removes_everything() -> None:
    with SeaweedFS() as s3:
        root, pid = s3.root, s3.pid
        assert pid is not None
        store = s3.store("keep")
        store.put("k", b"survives a restart")
        s3.stop()
        with pytest.raises(S3UnreachableError):
            store.size_of("k")
        s3.start()
        assert store.get("k", max_bytes=100) == b"survives a restart"
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_anonymous_requests_are_refused(seaweedfs: SeaweedFS) -> None:
    seaweedfs.store("private").put("secret", b"x")
    anonymous = boto3.session.Session().client(
        "s3", endpoint_url=seaweedfs.endpoint_url, region_name="us-east-1",
        config=botocore.config.Config(signature_version=botocore.UNSIGNED))
    with pytest.raises(botocore.exceptions.ClientError) as info:
        anonymous.get_object(Bucket="private", Key="secret")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


async def test_checkpoint_while_s3_is_down_then_back(tmp_path: Path) -> None:
    """S3 goes away under a device: writes and staged reads go on, a checkpoint fails
    with a typed error and keeps its writes, and succeeds once S3 is back."""
    with SeaweedFS() as s3:
        s3.store("down")  # the bucket
        store = ObjectStore.connect(replace(s3.config(), max_attempts=2), "down")
        obj = 64 * 1024
        dev = await S3Device.create(store, "disk", 4 * obj, block_size_bytes=4096,
                                    object_size_bytes=obj, staging_dir=tmp_path)
        await dev.write_at(0, b"before" * 1000)
        await dev.checkpoint()
        reader = await S3Device.open(store, "disk", staging_dir=tmp_path)
        s3.stop()
        await dev.write_at(obj, b"while down" * 100)
        assert await dev.read_at(obj, 10) == b"while down"
        with pytest.raises(S3DeviceError, match="reading object"):
            await reader.read_at(0, 6)  # not staged here: it needs S3
        with pytest.raises(S3DeviceError) as info:
            await dev.checkpoint()
        assert isinstance(info.value.__cause__, S3UnreachableError)
        assert dev.dirty_objects == 1
        s3.start()
        assert await reader.read_at(0, 6) == b"before"
        await reader.close()
        report = await dev.checkpoint()
        assert (report.sequence, report.objects_uploaded) == (3, 1)
        await dev.close()
        again = await S3Device.open(store, "disk", staging_dir=tmp_path)
        assert await again.read_at(0, 6) == b"before"
        assert await again.read_at(obj, 10) == b"while down"
        await again.close()


def test_module_runs_one_for_a_shell() -> None:
    """``python -m ferry.testing.s3``: exports on stdout, a working endpoint, and on
    SIGTERM no process or directory left."""
    proc = subprocess.Popen([sys.executable, "-m", "ferry.testing.s3", "--bucket", "demo"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        env = dict(re.findall(r"^export (\w+)=(\S+)$", "".join(lines), flags=re.M))
        match = re.search(r"pid (\d+), data in (\S+) ", lines[4])
        assert match is not None, lines
        weed, root = int(match.group(1)), Path(match.group(2))
        store = ObjectStore.connect(S3Config(
            endpoint_url=env["AWS_ENDPOINT_URL_S3"], region=env["AWS_DEFAULT_REGION"],
            credentials=S3Credentials(env["AWS_ACCESS_KEY_ID"],
                                      env["AWS_SECRET_ACCESS_KEY"])), "demo")
        store.put("k", b"v")
        assert store.get("k", max_bytes=1) == b"v"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(weed, 0)
