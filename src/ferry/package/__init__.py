"""Signed, single-file VM packages: keys, trust lists, writing, verifying, extracting.

A package directory (memory, device state, disks, kernel, initramfs and the
VM layer's manifest.json) becomes one zstd-compressed tar with a signed
header listing every file's SHA-256; a host verifies it against its trust
list before anything lands under the destination name. Format, signature
scheme and trust model: docs/package-format.md.

Typical use::

    info = generate_key("signing.key")                       # + signing.key.pub
    trust = TrustStore.from_path(trust_dir, missing_ok=True).add("signing.key.pub")
    write_package(vm_dir, "vm.ferry", load_private_key("signing.key"), manifest=m)
    extract_package("vm.ferry", "restored-vm", trust)
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
    from ferry.package.errors import (
        KeyFileError,
        PackageError,
        PackageExistsError,
        PackageFormatError,
        PackageIOError,
        PackageNoSpaceError,
        PackageSourceError,
        PackageTamperedError,
        PackageTruncatedError,
        SignatureError,
        UntrustedKeyError,
    )
    from ferry.package.format import FileEntry, PackageHeader, PackageInfo
    from ferry.package.keys import (
        KeyInfo,
        PublicKey,
        SigningKey,
        generate_key,
        key_id_of,
        load_private_key,
        load_public_key,
        parse_public_key,
    )
    from ferry.package.progress import Phase, Progress, ProgressCallback
    from ferry.package.reader import extract_package, verify_package
    from ferry.package.trust import TrustStore
    from ferry.package.writer import write_package

__all__ = [
    "FileEntry",
    "KeyFileError",
    "KeyInfo",
    "PackageError",
    "PackageExistsError",
    "PackageFormatError",
    "PackageHeader",
    "PackageIOError",
    "PackageInfo",
    "PackageNoSpaceError",
    "PackageSourceError",
    "PackageTamperedError",
    "PackageTruncatedError",
    "Phase",
    "Progress",
    "ProgressCallback",
    "PublicKey",
    "SignatureError",
    "SigningKey",
    "TrustStore",
    "UntrustedKeyError",
    "extract_package",
    "generate_key",
    "key_id_of",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "verify_package",
    "write_package",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "KeyFileError": "ferry.package.errors",
    "PackageError": "ferry.package.errors",
    "PackageExistsError": "ferry.package.errors",
    "PackageFormatError": "ferry.package.errors",
    "PackageIOError": "ferry.package.errors",
    "PackageNoSpaceError": "ferry.package.errors",
    "PackageSourceError": "ferry.package.errors",
    "PackageTamperedError": "ferry.package.errors",
    "PackageTruncatedError": "ferry.package.errors",
    "SignatureError": "ferry.package.errors",
    "UntrustedKeyError": "ferry.package.errors",
    "FileEntry": "ferry.package.format",
    "PackageHeader": "ferry.package.format",
    "PackageInfo": "ferry.package.format",
    "KeyInfo": "ferry.package.keys",
    "PublicKey": "ferry.package.keys",
    "SigningKey": "ferry.package.keys",
    "generate_key": "ferry.package.keys",
    "key_id_of": "ferry.package.keys",
    "load_private_key": "ferry.package.keys",
    "load_public_key": "ferry.package.keys",
    "parse_public_key": "ferry.package.keys",
    "Phase": "ferry.package.progress",
    "Progress": "ferry.package.progress",
    "ProgressCallback": "ferry.package.progress",
    "extract_package": "ferry.package.reader",
    "verify_package": "ferry.package.reader",
    "TrustStore": "ferry.package.trust",
    "write_package": "ferry.package.writer",
})
