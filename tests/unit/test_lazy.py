"""Lazy package namespaces (ferry.lazy): every public name resolves to what its module
defines, even after all of the package's modules were imported."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ferry

LAZY = sorted(
    name for _, name, is_pkg in pkgutil.walk_packages(ferry.__path__, "ferry.")
    if is_pkg and "lazy_exports(" in (
        Path(ferry.__path__[0]).parent / (name.replace(".", "/") + "/__init__.py")
    ).read_text()
)


def test_the_lazy_packages_are_found() -> None:
    assert {"ferry.live", "ferry.qemu", "ferry.s3", "ferry.oci"} <= set(LAZY)


@pytest.mark.parametrize("package", LAZY)
def test_no_public_name_is_hidden_by_a_module_of_the_same_name(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, package + "."):
        importlib.import_module(info.name)
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert not isinstance(value, types.ModuleType), (
            f"{package}.{name} is the module {value.__name__}: import it eagerly")
    assert set(pkg.__all__) <= set(dir(pkg))


def test_an_unknown_name_is_an_attribute_error() -> None:
    import ferry.live

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        ferry.live.nothing_here  # noqa: B018


def test_importing_a_light_module_loads_no_vmm() -> None:
    """What the lazy namespaces are for: the CLI's control client does not load QEMU's
    driver, FUSE or boto3."""
    code = ("import sys, ferry.node.control, ferry.s3.mirror; "
            "print(sorted(m for m in ('ferry.qemu.vm', 'pyfuse3', 'boto3') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
