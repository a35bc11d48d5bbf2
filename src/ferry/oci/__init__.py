"""OCI images: pull from a registry (through skopeo), unpack (through umoci) into an
ext4 root filesystem cached by manifest digest. See docs/oci.md.

Public API::

    parse_reference(text) -> ImageReference
    await pull(reference, cache_dir=..., options=PullOptions()) -> PulledImage
"""

from ferry.oci.errors import (
    ImageIntegrityError,
    ImageNotFoundError,
    ImageReferenceError,
    ImageTooLargeError,
    ManifestError,
    OCIError,
    PlatformError,
    RegistryError,
    UnpackError,
)
from ferry.oci.manifest import ExposedPort, ImageConfig
from ferry.oci.pull import PulledImage, PullOptions, PullPolicy, load_cached, pull
from ferry.oci.reference import ImageReference, parse_reference

__all__ = [
    "ExposedPort",
    "ImageConfig",
    "ImageIntegrityError",
    "ImageNotFoundError",
    "ImageReference",
    "ImageReferenceError",
    "ImageTooLargeError",
    "ManifestError",
    "OCIError",
    "PlatformError",
    "PullOptions",
    "PullPolicy",
    "PulledImage",
    "RegistryError",
    "UnpackError",
    "load_cached",
    "parse_reference",
    "pull",
]
