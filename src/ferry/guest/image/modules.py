"""Kernel module dependency resolution.

A :class:`ModuleIndex` maps module names to their file (relative to
``/lib/modules/<version>``) and their direct dependencies, in the shape of
``modules.dep``::

    kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko ...

:meth:`ModuleIndex.load_order` turns a list of wanted modules into the list
of files to ``insmod``, dependencies first, each once. Names compare with
``-`` and ``_`` equal, as the kernel does (``virtio-rng.ko`` is ``virtio_rng``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ferry.guest.image.elf import module_depends
from ferry.guest.image.errors import ModuleError

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    """The canonical module name of a ``.ko`` path: basename, suffix off, ``-`` -> ``_``."""
    base = PurePosixPath(path).name
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True, slots=True)
class ModuleIndex:
    """Module name -> (relative path, direct dependency names)."""

    paths: dict[str, str]
    depends: dict[str, tuple[str, ...]]

    @classmethod
    def parse_modules_dep(cls, text: str) -> ModuleIndex:
        """Parse the text of a ``modules.dep`` file."""
        paths: dict[str, str] = {}
        depends: dict[str, tuple[str, ...]] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            target, sep, deps = line.partition(":")
            if not sep:
                raise ModuleError(f"modules.dep line {lineno} has no ':'", module=target)
            name = module_name(target)
            paths[name] = target.strip()
            depends[name] = tuple(module_name(d) for d in deps.split())
        return cls(paths=paths, depends=depends)

    @classmethod
    def scan(cls, modules_dir: Path) -> ModuleIndex:
        """Build the index from the ``.modinfo`` of every uncompressed module.

        Used when the tree has no ``modules.dep`` (Debian's .deb ships none).
        """
        paths: dict[str, str] = {}
        depends: dict[str, tuple[str, ...]] = {}
        for ko in sorted(modules_dir.rglob("*.ko")):
            name = module_name(ko.name)
            paths[name] = ko.relative_to(modules_dir).as_posix()
            depends[name] = tuple(d.replace("-", "_") for d in module_depends(ko))
        return cls(paths=paths, depends=depends)

    @classmethod
    def for_tree(cls, modules_dir: Path) -> ModuleIndex:
        """Read ``modules.dep`` if present, else scan the modules' ``.modinfo``."""
        dep = modules_dir / "modules.dep"
        if dep.is_file():
            return cls.parse_modules_dep(dep.read_text())
        return cls.scan(modules_dir)

    def to_modules_dep(self) -> str:
        """Render the index in ``modules.dep`` format."""
        return "".join(
            f"{self.paths[n]}: {' '.join(self.paths[d] for d in self.depends[n])}".rstrip()
            + "\n"
            for n in sorted(self.paths)
        )

    def load_order(self, wanted: list[str]) -> list[str]:
        """Relative paths of ``wanted`` and their dependencies, dependencies first.

        Raises :class:`ModuleError` for an unknown module or a dependency cycle.
        """
        order: list[str] = []
        done: set[str] = set()
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(name) :], name])
                raise ModuleError(f"dependency cycle {cycle}", module=name)
            if name not in self.paths:
                via = f" (needed by {visiting[-1]})" if visiting else ""
                raise ModuleError(f"not found in the kernel's modules{via}", module=name)
            visiting.append(name)
            for dep in self.depends.get(name, ()):
                visit(dep)
            visiting.pop()
            done.add(name)
            order.append(self.paths[name])

        for name in wanted:
            visit(name.replace("-", "_"))
        return order
