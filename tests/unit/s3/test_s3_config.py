"""S3 URLs, and client configuration by boto3's standard chain (no request is made)."""

from __future__ import annotations

import pytest

from ferry.errors import ConfigError
from ferry.s3 import S3URL, S3Config, S3Credentials
from ferry.s3.device import Layout


@pytest.mark.parametrize(("text", "bucket", "key"), [
    ("s3://bucket/a/b.ferry", "bucket", "a/b.ferry"),
    ("s3://my.bucket-1/", "my.bucket-1", ""),
    ("s3://abc", "abc", ""),
])
def test_url_parse(text: str, bucket: str, key: str) -> None:
    url = S3URL.parse(text)
    assert (url.bucket, url.key) == (bucket, key)
    assert S3URL.parse(str(url)) == url


@pytest.mark.parametrize("text", ["http://b/k", "s3://", "s3://ab/k", "s3://Upper/k",
                                  "s3://a..b/k", "s3://-ab/k", "s3://b" + "x" * 70 + "/k",
                                  "s3://bucket/" + "k" * 1025])
def test_url_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        S3URL.parse(text)


def test_client_follows_the_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1234")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secretfromenv")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    client = S3Config().client()
    assert client.meta.endpoint_url == "http://127.0.0.1:1234"
    assert client.meta.region_name == "eu-west-3"
    creds = client._request_signer._credentials  # type: ignore[attr-defined]
    assert creds.access_key == "AKIDFROMENV"


def test_explicit_settings_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1234")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secretfromenv")
    client = S3Config(endpoint_url="http://127.0.0.1:9", region="us-east-1",
                      credentials=S3Credentials("explicit", "s")).client()
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.config.s3 == {"addressing_style": "path"}  # type: ignore[attr-defined]
    creds = client._request_signer._credentials  # type: ignore[attr-defined]
    assert creds.access_key == "explicit"


def test_secret_is_not_in_repr() -> None:
    assert "hunter2" not in repr(S3Credentials("id", "hunter2"))
    assert "hunter2" not in repr(S3Config(credentials=S3Credentials("id", "hunter2")))


@pytest.mark.parametrize("kwargs", [{"endpoint_url": "127.0.0.1:8333"},
                                    {"read_timeout_s": 0}, {"max_attempts": 0}])
def test_config_refuses_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        S3Config(**kwargs)  # type: ignore[arg-type]


def test_layout_keys() -> None:
    layout = Layout("vms/")
    assert layout.object_key(b"\xab" * 32) == "vms/objects/" + "ab" * 32
    # Names count down from 2**64 - 1, so the newest checkpoint is listed first.
    assert layout.manifest_key("disk", 12) == "vms/devices/disk/18446744073709551603.manifest"
    assert layout.manifest_key("disk", 13) < layout.manifest_key("disk", 12)
    assert layout.sequence_of("disk", layout.manifest_key("disk", 12)) == 12
    assert layout.sequence_of("disk", layout.manifest_key("disk", 2**64 - 1)) == 2**64 - 1
    for junk in ("vms/devices/disk/12.manifest", "vms/devices/disk/x",
                 "vms/devices/other/18446744073709551603.manifest",
                 "vms/devices/disk/18446744073709551615.manifest"):  # sequence 0
        assert layout.sequence_of("disk", junk) is None
    for bad_sequence in (0, 2**64):
        with pytest.raises(ConfigError):
            layout.manifest_key("disk", bad_sequence)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 129):
        with pytest.raises(ConfigError):
            layout.manifest_prefix(bad)
    with pytest.raises(ConfigError):
        Layout("no-slash")
