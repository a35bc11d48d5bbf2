"""Object storage: S3 clients by the standard AWS chain, and block devices stored in S3.

* :mod:`ferry.s3.config`: :class:`S3Config` (endpoint, region, credentials: boto3's chain
  unless overridden) and its boto3 client;
* :mod:`ferry.s3.store`: :class:`ObjectStore`, one bucket, bounded reads, typed errors;
* :mod:`ferry.s3.manifest`: the checkpoint manifest codec (sans-IO);
* :mod:`ferry.s3.device`: :class:`S3Device`, a device whose checkpoints live in S3;
* :mod:`ferry.s3.packages`: signed packages pushed to and pulled from a bucket.

Layout in the bucket, consistency and limits: docs/s3.md.
"""

from ferry.s3.cache import ObjectCache
from ferry.s3.config import S3Config, S3Credentials
from ferry.s3.device import CheckpointReport, Layout, S3Device, list_checkpoints
from ferry.s3.errors import (
    CheckpointConflictError,
    CheckpointNotFoundError,
    ManifestFormatError,
    ObjectCorruptError,
    ObjectMissingError,
    S3AuthError,
    S3ConflictError,
    S3DeviceError,
    S3Error,
    S3NotFoundError,
    S3ObjectTooLargeError,
    S3UnreachableError,
)
from ferry.s3.manifest import Manifest
from ferry.s3.store import ObjectStore
from ferry.s3.url import S3URL

__all__ = [
    "S3URL",
    "CheckpointConflictError",
    "CheckpointNotFoundError",
    "CheckpointReport",
    "Layout",
    "Manifest",
    "ManifestFormatError",
    "ObjectCache",
    "ObjectCorruptError",
    "ObjectMissingError",
    "ObjectStore",
    "S3AuthError",
    "S3Config",
    "S3ConflictError",
    "S3Credentials",
    "S3Device",
    "S3DeviceError",
    "S3Error",
    "S3NotFoundError",
    "S3ObjectTooLargeError",
    "S3UnreachableError",
    "list_checkpoints",
]
