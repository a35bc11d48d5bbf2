"""Errors of the package layer (signed VM packages, keys, trust lists)::

    FerryError
    └── PackageError                    a package could not be written, read or trusted
        ├── PackageFormatError          not a ferry package, or its structure is invalid
        │   └── PackageTruncatedError   the file ends before the package does
        ├── PackageTamperedError        size or SHA-256 differs from the signed list (.path)
        ├── SignatureError              the signature is missing, malformed or does not verify
        │   └── UntrustedKeyError       signed by a key the trust list does not hold (.key_id)
        ├── KeyFileError                key or trust file missing, malformed, unsafe (.path)
        ├── PackageSourceError          the source directory holds what a package cannot
        ├── PackageExistsError          output file or destination dir exists (.path)
        └── PackageIOError              reading or writing the disk failed (.path)
            └── PackageNoSpaceError     the disk filled up (ENOSPC) (.path)

Whatever failed, nothing half-written is left under the final name.
"""

from __future__ import annotations

from ferry.errors import FerryError


class PackageError(FerryError):
    """A package could not be written, read or trusted."""


class PackageFormatError(PackageError):
    """The file is not a ferry package, or its structure breaks the format."""


class PackageTruncatedError(PackageFormatError):
    """The file ends before the package does (a cut-off download or copy)."""


class PackageTamperedError(PackageError):
    """A content file's size or SHA-256 differs from the signed file list."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class SignatureError(PackageError):
    """The signature is missing, malformed, or does not verify."""


class UntrustedKeyError(SignatureError):
    """The package is signed by a key that the trust list does not hold."""

    def __init__(self, message: str, *, key_id: str) -> None:
        super().__init__(f"{message}: key {key_id}")
        self.key_id = key_id


class KeyFileError(PackageError):
    """A key or trust-list file is missing, malformed, or readable by others."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class PackageSourceError(PackageError):
    """The directory to package holds something a package cannot carry, or changed meanwhile."""


class PackageExistsError(PackageError):
    """The output file or destination directory exists and overwrite was not asked for."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class PackageIOError(PackageError):
    """Reading or writing the disk failed."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class PackageNoSpaceError(PackageIOError):
    """The disk filled up (ENOSPC) while writing a package or extracting one."""
