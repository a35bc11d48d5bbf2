"""Errors of the S3 layer: requests to object storage, and the S3-backed device::

    FerryError
    ├── S3Error                         an S3 request failed (.endpoint, .bucket, .key)
    │   ├── S3UnreachableError          the endpoint did not answer (after botocore's retries)
    │   ├── S3AuthError                 credentials missing, wrong, or refused
    │   ├── S3NotFoundError             no such bucket or key
    │   ├── S3ConflictError             a create-only write found the key already there
    │   └── S3ObjectTooLargeError       an object is larger than the reader allows
    └── DeviceError
        └── S3DeviceError               the S3-backed device refused an operation (.device)
            ├── CheckpointNotFoundError no checkpoint (manifest) of this device in the bucket
            ├── CheckpointConflictError another writer made the same checkpoint first
            ├── ManifestFormatError     a manifest is malformed, truncated or of another version
            ├── ObjectMissingError      a manifest names an object the bucket does not hold
            └── ObjectCorruptError      an object's bytes do not match the hash that names it

Every message names the endpoint and the object, so one line says what to fix.
None of these errors deletes or overwrites anything already stored.
"""

from __future__ import annotations

from ferry.errors import DeviceError, FerryError


class S3Error(FerryError):
    """An S3 request failed."""

    def __init__(self, message: str, *, endpoint: str, bucket: str | None = None,
                 key: str | None = None) -> None:
        where = f"s3://{bucket}/{key or ''}" if bucket else ""
        super().__init__(f"{endpoint}: {where + ': ' if where else ''}{message}")
        self.endpoint = endpoint
        self.bucket = bucket
        self.key = key


class S3UnreachableError(S3Error):
    """The endpoint could not be reached or timed out, after botocore's retries."""


class S3AuthError(S3Error):
    """No credentials were found, or the endpoint refused the ones given."""


class S3NotFoundError(S3Error):
    """The bucket or the key does not exist."""


class S3ConflictError(S3Error):
    """A create-only write (``If-None-Match: *``) found the key already there."""


class S3ObjectTooLargeError(S3Error):
    """An object is larger than the caller's bound (a manifest, a device object, a package)."""


class S3DeviceError(DeviceError):
    """The S3-backed device refused an operation."""


class CheckpointNotFoundError(S3DeviceError):
    """The bucket holds no checkpoint of this device (or not the one asked for)."""


class CheckpointConflictError(S3DeviceError):
    """Another writer stored a checkpoint with the same sequence number first."""


class ManifestFormatError(S3DeviceError):
    """A manifest is malformed, truncated, or of a version this ferry cannot read."""

    def __init__(self, message: str, *, device: str | None = None,
                 key: str | None = None) -> None:
        super().__init__(f"manifest {key}: {message}" if key else message, device=device)
        self.key = key
        self.detail = message


class ObjectMissingError(S3DeviceError):
    """A manifest names an object that the bucket does not hold."""

    def __init__(self, message: str, *, device: str | None = None, key: str) -> None:
        super().__init__(f"object {key}: {message}", device=device)
        self.key = key


class ObjectCorruptError(S3DeviceError):
    """An object's bytes do not match the SHA-256 that names it (truncated or tampered)."""

    def __init__(self, message: str, *, device: str | None = None, key: str) -> None:
        super().__init__(f"object {key}: {message}", device=device)
        self.key = key
