"""Guest images: kernel, initramfs and root disk built from a blueprint.

Public API::

    build_blueprint(blueprint, out_dir=None, *, cache_dir) -> BuiltImage
    load_blueprint(path_or_name) -> Blueprint

How to boot an image is the QEMU driver's business: see :mod:`ferry.qemu`.
"""

from ferry.guest.image.blueprint import Blueprint, BuiltImage, build_blueprint, load_blueprint
from ferry.guest.image.errors import BlueprintError, ImageError, ModuleError, PackageError

__all__ = [
    "Blueprint",
    "BlueprintError",
    "BuiltImage",
    "ImageError",
    "ModuleError",
    "PackageError",
    "build_blueprint",
    "load_blueprint",
]
