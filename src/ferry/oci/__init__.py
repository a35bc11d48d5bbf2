"""OCI images: pull from a registry (through skopeo), unpack (through umoci) into an
ext4 root filesystem cached by manifest digest. See docs/oci.md.

Public API::

    parse_reference(text) -> ImageReference
    await pull(reference, cache_dir=..., options=PullOptions()) -> PulledImage
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

# Eager: ``pull`` names both a function and its module, and importing the module would
# set the package's ``pull`` to the module, hiding a lazy function (it is light anyway).
from ferry.oci.pull import PulledImage, PullOptions, PullPolicy, load_cached, pull

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_exports(__name__, {
    "ImageIntegrityError": "ferry.oci.errors",
    "ImageNotFoundError": "ferry.oci.errors",
    "ImageReferenceError": "ferry.oci.errors",
    "ImageTooLargeError": "ferry.oci.errors",
    "ManifestError": "ferry.oci.errors",
    "OCIError": "ferry.oci.errors",
    "PlatformError": "ferry.oci.errors",
    "RegistryError": "ferry.oci.errors",
    "UnpackError": "ferry.oci.errors",
    "ExposedPort": "ferry.oci.manifest",
    "ImageConfig": "ferry.oci.manifest",
    "ImageReference": "ferry.oci.reference",
    "parse_reference": "ferry.oci.reference",
})
