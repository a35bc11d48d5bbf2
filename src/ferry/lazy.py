"""Package namespaces that import their modules on first use (PEP 562).

A package's ``__init__`` that imports every module makes ``import ferry.live.access``
load all of live migration, QEMU and FUSE: the CLI paid ~0.3 s for that on every
command. A package lists its public names here instead (and imports them under
``TYPE_CHECKING`` for the type checker)::

    __getattr__, __dir__ = lazy_exports(__name__, {"IncomingVM": "ferry.live.destination"})

A public name that is also the name of one of the package's modules (``ferry.oci.pull``
the function, ``ferry/oci/pull.py`` the module) cannot be lazy: importing the module sets
the package attribute to the module. Such names are imported eagerly;
tests/unit/test_lazy.py checks every lazy package for it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str],
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose public names ``exports`` maps
    to the module that defines each."""
    table = dict(exports)

    def __getattr__(name: str) -> object:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(set(table) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
