"""The SeaweedFS test service: it answers signed requests only, survives a restart with
its data, and leaves no process or directory behind."""

from __future__ import annotations

import os

import boto3
import botocore
import botocore.config
import pytest

from ferry.s3 import S3UnreachableError
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
