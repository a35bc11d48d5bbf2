"""Object storage: S3 clients by the standard AWS chain, and block devices stored in S3.

* :mod:`ferry.s3.config`: :class:`S3Config` (endpoint, region, credentials: boto3's chain
  unless overridden) and its boto3 client;
* :mod:`ferry.s3.store`: :class:`ObjectStore`, one bucket, bounded reads, typed errors;
* :mod:`ferry.s3.manifest`: the checkpoint manifest codec (sans-IO);
* :mod:`ferry.s3.device`: :class:`S3Device`, a device whose checkpoints live in S3;
* :mod:`ferry.s3.packages`: signed packages pushed to and pulled from a bucket.

Layout in the bucket, consistency and limits: docs/s3.md.
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_exports(__name__, {
    "ObjectCache": "ferry.s3.cache",
    "S3Config": "ferry.s3.config",
    "S3Credentials": "ferry.s3.config",
    "CheckpointReport": "ferry.s3.device",
    "Layout": "ferry.s3.device",
    "S3Device": "ferry.s3.device",
    "list_checkpoints": "ferry.s3.device",
    "CheckpointConflictError": "ferry.s3.errors",
    "CheckpointNotFoundError": "ferry.s3.errors",
    "ManifestFormatError": "ferry.s3.errors",
    "ObjectCorruptError": "ferry.s3.errors",
    "ObjectMissingError": "ferry.s3.errors",
    "S3AuthError": "ferry.s3.errors",
    "S3ConflictError": "ferry.s3.errors",
    "S3DeviceError": "ferry.s3.errors",
    "S3Error": "ferry.s3.errors",
    "S3NotFoundError": "ferry.s3.errors",
    "S3ObjectTooLargeError": "ferry.s3.errors",
    "S3UnreachableError": "ferry.s3.errors",
    "Manifest": "ferry.s3.manifest",
    "ObjectStore": "ferry.s3.store",
    "S3URL": "ferry.s3.url",
})
