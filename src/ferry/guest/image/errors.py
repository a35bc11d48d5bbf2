"""Errors of the guest image builder.

::

    FerryError
    ├── ConfigError
    │   └── BlueprintError        a blueprint file is malformed or invalid (.path)
    └── ImageError                building an image failed
        ├── PackageError          a Debian package could not be resolved/fetched (.package)
        ├── ModuleError           a kernel module or its dependency is missing (.module)
        └── ElfError              an ELF file could not be parsed (.path)
"""

from __future__ import annotations

from ferry.errors import ConfigError, FerryError


class BlueprintError(ConfigError):
    """A blueprint file is malformed or fails validation."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ImageError(FerryError):
    """Building a kernel, initramfs or root filesystem failed."""


class PackageError(ImageError):
    """A Debian package could not be resolved, downloaded or unpacked."""

    def __init__(self, message: str, *, package: str) -> None:
        super().__init__(f"package {package}: {message}")
        self.package = package


class ModuleError(ImageError):
    """A kernel module, or one of its dependencies, is not in the kernel's tree."""

    def __init__(self, message: str, *, module: str) -> None:
        super().__init__(f"module {module}: {message}")
        self.module = module


class ElfError(ImageError):
    """A file that should be ELF could not be parsed."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
