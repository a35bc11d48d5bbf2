"""A bucket, seen through a few blocking calls with bounded reads and typed errors.

:class:`ObjectStore` is the one place where botocore's exceptions become
ferry's (:mod:`ferry.s3.errors`), so nothing above it imports botocore. Every
read is bounded by the caller (``max_bytes``): the size S3 announces is
checked before the body is read, and a body that ends early is an error, never
a short result. The calls block (boto3 is synchronous); async callers run them
with ``asyncio.to_thread`` (the client is thread-safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import botocore.exceptions

from ferry.buffers import Buffer
from ferry.s3.config import S3Config
from ferry.s3.errors import (
    S3AuthError,
    S3ConflictError,
    S3Error,
    S3NotFoundError,
    S3ObjectTooLargeError,
    S3UnreachableError,
)

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import PaginatorConfigTypeDef

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20
"""A response body is read in pieces of this size, so a bound is enforced while
reading, not after a server has pushed an unbounded body into memory."""

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_AUTH = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken",
         "InvalidToken", "403", "Forbidden"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_UNREACHABLE = (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError,
                botocore.exceptions.ConnectionClosedError)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size_bytes: int


class ObjectStore:
    """One bucket of one endpoint."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket
        self.endpoint = client.meta.endpoint_url

    @classmethod
    def connect(cls, config: S3Config, bucket: str) -> ObjectStore:
        return cls(config.client(), bucket)

    def _error(self, cls: type[S3Error], message: str, key: str | None) -> S3Error:
        return cls(message, endpoint=self.endpoint, bucket=self.bucket, key=key)

    def _fail(self, exc: Exception, action: str, key: str | None) -> NoReturn:
        """Raise the ferry error for botocore's ``exc`` (the one translation point)."""
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = f"{action}: {code or status} {err.get('Message', '')}".strip()
            if code in _NOT_FOUND or status == 404:
                raise self._error(S3NotFoundError, detail, key) from exc
            if code in _AUTH or status == 403:
                raise self._error(S3AuthError, f"{detail} (check the credentials for "
                                  "this endpoint)", key) from exc
            if code in _CONFLICT or status == 412:
                raise self._error(S3ConflictError, detail, key) from exc
            raise self._error(S3Error, detail, key) from exc
        if isinstance(exc, botocore.exceptions.NoCredentialsError
                      | botocore.exceptions.PartialCredentialsError):
            raise self._error(S3AuthError, f"{action}: no S3 credentials found (set "
                              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in "
                              "~/.aws)", key) from exc
        if isinstance(exc, _UNREACHABLE):
            raise self._error(S3UnreachableError, f"{action}: {exc}", key) from exc
        raise self._error(S3Error, f"{action}: {exc}", key) from exc

    def get(self, key: str, *, max_bytes: int) -> bytes:
        """The object's bytes; more than ``max_bytes`` is an :class:`S3ObjectTooLargeError`,
        raised without reading past the bound."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "get", key)
        body = resp["Body"]
        try:
            announced = resp.get("ContentLength")
            if announced is not None and announced > max_bytes:
                raise S3ObjectTooLargeError(f"{announced} bytes, more than the {max_bytes} "
                                            "allowed", endpoint=self.endpoint,
                                            bucket=self.bucket, key=key)
            parts: list[bytes] = []
            got = 0
            while True:
                chunk = body.read(min(READ_CHUNK_BYTES, max_bytes + 1 - got))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
                if got > max_bytes:
                    raise S3ObjectTooLargeError(f"body longer than the {max_bytes} bytes "
                                                "allowed", endpoint=self.endpoint,
                                                bucket=self.bucket, key=key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "get (reading the body)", key)
        finally:
            body.close()
        data = b"".join(parts)
        if announced is not None and len(data) != announced:
            raise S3Error(f"get: body ended after {len(data)} of {announced} bytes",
                          endpoint=self.endpoint, bucket=self.bucket, key=key)
        return data

    def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None:
        """Store ``data`` under ``key``; with ``create_only``, an existing key is an
        :class:`S3ConflictError` (``If-None-Match: *``) and stays as it was."""
        body = bytes(data)
        try:
            if create_only:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
            else:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "put", key)

    def size_of(self, key: str) -> int | None:
        """The object's size, or None if there is no such key."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            try:
                self._fail(exc, "head", key)
            except S3NotFoundError:
                return None

    def list(self, prefix: str, *, limit: int | None = None) -> Iterator[ObjectInfo]:
        """The objects under ``prefix`` in key order (the first ``limit`` of them)."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages: PaginatorConfigTypeDef = (
            {} if limit is None else {"MaxItems": limit, "PageSize": min(limit, 1000)})
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix,
                                           PaginationConfig=pages):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"], item["Size"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "list", prefix)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "delete", key)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (for the embedded SeaweedFS and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            with contextlib.suppress(S3NotFoundError):
                self._fail(exc, "head bucket", None)
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "create bucket", None)

    def upload_file(self, path: Path, key: str, *, transfer: TransferConfig | None = None
                    ) -> None:
        """Upload a file with s3transfer (multipart, parallel parts for large files)."""
        try:
            self.client.upload_file(os.fspath(path), self.bucket, key, Config=transfer)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "upload", key)
        except boto3_transfer_failed() as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            self._fail(cause, "upload", key)

    def download_file(self, key: str, path: Path, *, max_bytes: int,
                      transfer: TransferConfig | None = None) -> int:
        """Download ``key`` into ``path`` (which must not be trusted until verified);
        an object over ``max_bytes`` is refused before any byte is fetched."""
        size = self.size_of(key)
        if size is None:
            raise S3NotFoundError("download: no such key", endpoint=self.endpoint,
                                  bucket=self.bucket, key=key)
        if size > max_bytes:
            raise S3ObjectTooLargeError(f"{size} bytes, more than the {max_bytes} allowed",
                                        endpoint=self.endpoint, bucket=self.bucket, key=key)
        try:
            self.client.download_file(self.bucket, key, os.fspath(path), Config=transfer)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            self._fail(exc, "download", key)
        got = path.stat().st_size
        if got != size:  # replaced meanwhile by a larger or smaller object
            raise S3Error(f"download: got {got} bytes, the object had {size}",
                          endpoint=self.endpoint, bucket=self.bucket, key=key)
        return got


def boto3_transfer_failed() -> type[Exception]:
    """s3transfer wraps upload failures in boto3's ``S3UploadFailedError``."""
    from boto3.exceptions import S3UploadFailedError

    return S3UploadFailedError
