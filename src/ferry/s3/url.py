"""``s3://BUCKET/KEY`` URLs, parsed and checked once at the edge."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ferry.errors import ConfigError

SCHEME = "s3://"

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
"""S3's bucket naming rules (3-63 characters, lower case, digits, dots, hyphens)."""

MAX_KEY_BYTES = 1024
"""S3's own limit on a key's UTF-8 length."""


@dataclass(frozen=True, slots=True)
class S3URL:
    """A bucket and a key (the key may be empty: the bucket itself)."""

    bucket: str
    key: str

    def __post_init__(self) -> None:
        if not _BUCKET.fullmatch(self.bucket) or ".." in self.bucket:
            raise ConfigError(f"{self.bucket!r} is not a valid S3 bucket name "
                              "(3-63 characters: a-z, 0-9, '.', '-')")
        if len(self.key.encode()) > MAX_KEY_BYTES:
            raise ConfigError(f"S3 key longer than {MAX_KEY_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> S3URL:
        """``s3://bucket/some/key`` -> ``S3URL("bucket", "some/key")``."""
        if not text.startswith(SCHEME):
            raise ConfigError(f"{text!r} is not an s3:// URL")
        bucket, _, key = text[len(SCHEME):].partition("/")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def is_s3_url(text: str) -> bool:
    return text.startswith(SCHEME)
