"""How ferry reaches an S3 endpoint: boto3's standard configuration chain, plus overrides.

Nothing here signs a request or reads a credentials file: boto3 does, the way
every AWS tool does. With every field left at ``None`` ferry uses exactly what
``aws s3`` would:

* endpoint: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, else ``endpoint_url``
  in the profile's section of ``~/.aws/config``, else AWS itself;
* region: ``AWS_DEFAULT_REGION``, else the profile's ``region``;
* credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/
  ``AWS_SESSION_TOKEN``), ``~/.aws/credentials``, SSO, instance metadata ...;
* profile: ``AWS_PROFILE``.

:class:`S3Config` overrides any of them (the CLI's ``--endpoint-url``; tests that
start their own SeaweedFS pass its credentials explicitly rather than editing
the process environment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ferry.errors import ConfigError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DEFAULT_MAX_ATTEMPTS = 5
"""botocore's "standard" retry mode tries a request this often (throttling, 5xx,
connection resets, timeouts) with jittered exponential backoff. The AWS CLI
default is 3; a checkpoint upload is worth a little more patience."""

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
"""Time allowed between bytes, not for a whole transfer: a 4 MiB object on a slow
link is still fine; a dead endpoint is given up on (and retried) within 30 s."""

DEFAULT_MAX_CONNECTIONS = 16
"""Connection pool size. It must be at least the device's upload concurrency,
or uploads queue for a connection inside urllib3 (and log a warning)."""

AddressingStyle = Literal["auto", "path", "virtual"]


@dataclass(frozen=True, slots=True)
class S3Credentials:
    """A static key pair (for the embedded SeaweedFS, or an explicit override)."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where and how to reach S3; ``None`` fields come from boto3's chain (module docstring)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials: S3Credentials | None = None
    addressing_style: AddressingStyle | None = None
    """``None``: path style when ``endpoint_url`` is given (SeaweedFS, MinIO, R2 and
    AWS all accept it, and a bucket need not resolve as a host name), else the
    chain's setting (virtual hosts on AWS)."""
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
                ("http://", "https://")):
            raise ConfigError(f"S3 endpoint {self.endpoint_url!r} must start with "
                              "http:// or https://")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ConfigError("S3 timeouts must be positive")
        if self.max_attempts < 1 or self.max_connections < 1:
            raise ConfigError("S3 max_attempts and max_connections must be >= 1")

    def client(self) -> S3Client:
        """A boto3 S3 client (thread-safe; share one per process and endpoint)."""
        # Imported here: boto3 costs every CLI command ~0.15 s, most never reach S3.
        import boto3
        import botocore.config

        session = boto3.session.Session(profile_name=self.profile)
        style = self.addressing_style or ("path" if self.endpoint_url else None)
        cfg = botocore.config.Config(
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            max_pool_connections=self.max_connections,
            s3={"addressing_style": style} if style else None,
        )
        creds = self.credentials
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=creds.access_key_id if creds else None,
            aws_secret_access_key=creds.secret_access_key if creds else None,
            aws_session_token=creds.session_token if creds else None,
            config=cfg,
        )
