"""Guest images: kernel, initramfs and root disk built from a blueprint.

Public API::

    build_blueprint(blueprint, out_dir=None, *, cache_dir) -> BuiltImage
    load_blueprint(path_or_name) -> Blueprint

How to boot an image is the QEMU driver's business: see :mod:`ferry.qemu`.
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_exports(__name__, {
    "Blueprint": "ferry.guest.image.blueprint",
    "BuiltImage": "ferry.guest.image.blueprint",
    "build_blueprint": "ferry.guest.image.blueprint",
    "load_blueprint": "ferry.guest.image.blueprint",
    "BlueprintError": "ferry.guest.image.errors",
    "ImageError": "ferry.guest.image.errors",
    "ModuleError": "ferry.guest.image.errors",
    "PackageError": "ferry.guest.image.errors",
})
