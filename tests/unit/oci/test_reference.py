from __future__ import annotations

import pytest

from ferry.oci import ImageReference, ImageReferenceError, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("redis", ImageReference("docker.io", "library/redis", "latest", None)),
    ("redis:7", ImageReference("docker.io", "library/redis", "7", None)),
    ("user/app:v1.2", ImageReference("docker.io", "user/app", "v1.2", None)),
    ("localhost/app", ImageReference("localhost", "app", "latest", None)),
    ("127.0.0.1:5000/redis:7", ImageReference("127.0.0.1:5000", "redis", "7", None)),
    ("oci://127.0.0.1:5000/a/b/c:t", ImageReference("127.0.0.1:5000", "a/b/c", "t", None)),
    ("ghcr.io/o/r@" + DIGEST, ImageReference("ghcr.io", "o/r", None, DIGEST)),
    ("ghcr.io/o/r:t@" + DIGEST, ImageReference("ghcr.io", "o/r", "t", DIGEST)),
    ("[::1]:5000/x", ImageReference("[::1]:5000", "x", "latest", None)),
])
def test_parses_like_docker(text: str, expected: ImageReference) -> None:
    assert parse_reference(text) == expected


def test_str_round_trips_and_pins() -> None:
    ref = parse_reference("127.0.0.1:5000/redis:7")
    assert str(ref) == "127.0.0.1:5000/redis:7"
    assert parse_reference(str(ref)) == ref
    assert ref.pinned(DIGEST) == f"127.0.0.1:5000/redis@{DIGEST}"


@pytest.mark.parametrize(("text", "loopback"), [
    ("127.0.0.1:5000/x", True), ("localhost:5000/x", True), ("[::1]:5000/x", True),
    ("127.9.9.9/x", True), ("10.0.0.1:5000/x", False), ("ghcr.io/x", False), ("x", False),
])
def test_loopback(text: str, loopback: bool) -> None:
    assert parse_reference(text).is_loopback is loopback


@pytest.mark.parametrize("text", [
    "", "  ", "Upper/case", "a//b", "x:", "x:-tag", "x@sha256:short", "x@md5:" + "0" * 32,
    "host:5000/", "a b", "x" * 600, "reg.io/a:b:c",
])
def test_refuses_bad_references(text: str) -> None:
    with pytest.raises(ImageReferenceError) as err:
        parse_reference(text)
    assert "\n" not in str(err.value)
