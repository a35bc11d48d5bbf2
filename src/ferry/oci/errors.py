"""Errors of pulling OCI images.

::

    FerryError
    ├── ConfigError
    │   └── ImageReferenceError     REGISTRY/REPO:TAG does not parse (.reference)
    └── OCIError                    pulling or unpacking an image failed (.reference)
        ├── ImageNotFoundError      no such repository, tag or digest in the registry
        ├── RegistryError           the registry could not be reached or refused us
        ├── ImageIntegrityError     content does not match its digest (manifest, config, layer)
        ├── ManifestError           a manifest or config is malformed or unsupported
        ├── PlatformError           the image is not for linux/amd64
        ├── ImageTooLargeError      a layer (or the layer count) is over a limit
        └── UnpackError             umoci or mkfs.ext4 failed on the layers

Every message is one line and starts with the image reference.
"""

from __future__ import annotations

from ferry.errors import ConfigError, FerryError


class ImageReferenceError(ConfigError):
    """An image reference does not parse."""

    def __init__(self, message: str, *, reference: str) -> None:
        super().__init__(f"image {reference!r}: {message}")
        self.reference = reference


class OCIError(FerryError):
    """Pulling or unpacking an OCI image failed."""

    def __init__(self, message: str, *, reference: str) -> None:
        super().__init__(f"image {reference}: {' '.join(message.split())}")
        self.reference = reference


class ImageNotFoundError(OCIError):
    """The registry has no such repository, tag or digest."""


class RegistryError(OCIError):
    """The registry could not be reached, refused the credentials, or failed."""


class ImageIntegrityError(OCIError):
    """A manifest, config or layer does not match the digest that names it."""


class ManifestError(OCIError):
    """A manifest, index or image config is malformed or of an unsupported kind."""


class PlatformError(OCIError):
    """The image is built for another OS or architecture than the guest's."""


class ImageTooLargeError(OCIError):
    """A layer, the number of layers, or a manifest is over ferry's limit."""


class UnpackError(OCIError):
    """Unpacking the layers or writing the root filesystem failed."""
