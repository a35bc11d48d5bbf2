"""One real SeaweedFS (``weed mini``) per session; a fresh bucket per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from ferry.s3 import ObjectStore
from ferry.testing.s3 import SeaweedFS


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    with SeaweedFS() as s3:
        yield s3


@pytest.fixture
def store(seaweedfs: SeaweedFS) -> ObjectStore:
    """An empty bucket of its own (left for the session's SeaweedFS to remove)."""
    return seaweedfs.store(f"t-{secrets.token_hex(6)}")
