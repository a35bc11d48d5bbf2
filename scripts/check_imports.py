#!/usr/bin/env python3
"""Check ferry's import graph: no cycles, and upper layers import lower ones only.

Every ``import``/``from ... import`` of a ``ferry`` module counts, wherever it
sits (a function-level import hides a cycle from Python, not from a reader);
only imports under ``if TYPE_CHECKING:`` are left out. Two checks:

1. **No cycles** between modules (Tarjan's strongly connected components).
2. **Layers**: each top-level room of ``src/ferry`` sits on a floor (``FLOORS``
   below, bottom first); a module may import its own room and rooms on lower
   floors, never a room above it nor a sibling on the same floor.

Usage: ``scripts/check_imports.py [--graph]`` (exit 1 and one line per problem).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Bottom first. A room is a top-level package or module of ferry.
FLOORS: list[set[str]] = [
    {"errors", "aio", "buffers", "latency", "lazy", "__init__"},
    {"hostconfig", "shape"},  # the host's directories and QEMU choices; a VM's machine shape
    {"storage"},
    {"protocol"},
    {"transport", "net", "package", "spot"},  # spot: providers' metadata notices
    {"s3"},  # object storage: S3 client, S3-backed devices, packages in buckets
    {"migration", "expose"},
    {"guest"},  # what is built for the guest and its agent's host-side client
    {"oci"},  # container images: pulled through skopeo, unpacked by umoci into ext4
    {"qemu"},  # the VMM driver (the accelerator probe boots a guest kernel)
    {"vm"},  # one VM on one host
    {"live"},  # moving a running VM
    {"node"},  # the processes that hold VMs
    {"cluster"},  # nodes, placement and evacuations in etcd; the scheduler
    {"daemon"},  # the node daemon: its HTTP API over the VM holders
    {"testing"},  # test and benchmark harness: namespaces as hosts, a Redis writer
    {"demo", "doctor"},
    {"cli"},
]


def floor_of(room: str) -> int:
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    raise SystemExit(f"check_imports: room {room!r} has no floor: add it to FLOORS")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "ferry").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) for every import outside ``if TYPE_CHECKING``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]
        stack.extend(ast.iter_child_nodes(node))


def graph(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported ferry module: first line}."""
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        for line, target, names in _imports(ast.parse(path.read_text(), str(path))):
            if not (target == "ferry" or target.startswith("ferry.")):
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods] or [target]
            for hit in hits:
                while hit not in mods and "." in hit:
                    hit = hit.rpartition(".")[0]
                if hit != mod and hit in mods:
                    edges[mod].setdefault(hit, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print the room-level graph")
    args = parser.parse_args()
    mods = modules()
    edges = graph(mods)
    problems = []
    for comp in cycles(edges):
        problems.append("import cycle: " + " <-> ".join(comp))
    rooms: dict[str, set[str]] = {}
    for mod, targets in edges.items():
        for target, line in targets.items():
            a, b = room(mod), room(target)
            if a == b:
                continue
            rooms.setdefault(a, set()).add(b)
            if floor_of(b) >= floor_of(a):
                where = mods[mod].relative_to(SRC.parent)
                problems.append(
                    f"{where}:{line}: {mod} imports {target}: "
                    f"'{b}' is not below '{a}' (see FLOORS in {Path(__file__).name})"
                )
    if args.graph:
        for a in sorted(rooms, key=floor_of):
            print(f"{a:>10} -> {', '.join(sorted(rooms[a], key=floor_of))}")
    for p in problems:
        print(p)
    if problems:
        print(f"check_imports: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_imports: {len(mods)} modules, no cycles, every import goes down a floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
