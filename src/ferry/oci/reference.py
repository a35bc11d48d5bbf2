"""Image references: ``[REGISTRY/]REPO[:TAG][@sha256:HEX]``, as docker reads them.

The first path component is a registry if it contains ``.`` or ``:`` or is
``localhost``; otherwise the registry is Docker Hub (``docker.io``) and a one-part
repository gets ``library/``, as ``docker pull redis`` does. Without a tag or digest
the tag is ``latest``. An ``oci://`` prefix (``ferry vm run oci://...``) is accepted.

Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ferry.oci.errors import ImageReferenceError

SCHEME = "oci://"
DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
# The distribution spec's grammar (docs/content/spec.md in distribution/distribution).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")
MAX_REFERENCE_CHARS = 512


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed reference. ``tag`` is set unless only a digest was given."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        return (f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))

    @property
    def name(self) -> str:
        """``REGISTRY/REPO``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def pinned(self, digest: str) -> str:
        """``REGISTRY/REPO@DIGEST``: exactly that manifest, whatever the tag says now."""
        return f"{self.name}@{digest}"

    @property
    def is_loopback(self) -> bool:
        """Whether the registry is on this host (plain HTTP is then allowed)."""
        host = self.registry
        host = host[1:host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_reference(text: str) -> ImageReference:
    """Parse ``text``; raise :class:`ImageReferenceError` with what is wrong."""
    original = text
    if len(text) > MAX_REFERENCE_CHARS:
        raise ImageReferenceError(f"longer than {MAX_REFERENCE_CHARS} characters",
                                  reference=text[:40] + "...")
    if text.startswith(SCHEME):
        text = text[len(SCHEME):]
    if not text or any(c.isspace() for c in text):
        raise ImageReferenceError("empty or contains whitespace", reference=original)
    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise ImageReferenceError("digest must be sha256: and 64 lowercase hex digits",
                                      reference=original)
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
        if not _HOST_RE.match(registry):
            raise ImageReferenceError(f"bad registry host {registry!r}", reference=original)
    else:
        registry, path = DEFAULT_REGISTRY, text
    tag: str | None = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ImageReferenceError(f"bad tag {tag!r}", reference=original)
    if not _REPO_RE.match(path):
        raise ImageReferenceError(f"bad repository name {path!r} (lowercase letters, digits, "
                                  "separators . _ - and /)", reference=original)
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(registry, path, tag, digest)
