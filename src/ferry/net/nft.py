"""nftables tables owned by ferry: one table per VM per namespace.

Every rule ferry installs for a VM lives in a table named
:func:`table_name` (``ferry_<vmid>``), so deleting that one table removes
every rule at once and nothing else is touched. Scripts are loaded with
``nft -f -``, which applies them atomically: a table is either fully in
place or absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ferry.net.command import run
from ferry.net.netns import netns_exec_argv

TABLE_PREFIX = "ferry_"


@dataclass(frozen=True, slots=True)
class TableRef:
    """An nft table in a namespace (``None``: the caller's own namespace)."""

    namespace: str | None
    family: str
    name: str


def table_name(vm_id: str) -> str:
    """``ferry_<vmid>`` with ``-`` mapped to ``_`` (nft identifiers have no ``-``).

    VM ids never contain ``_``, so the mapping is one-to-one.
    """
    return TABLE_PREFIX + vm_id.replace("-", "_")


async def load(namespace: str | None, script: str) -> None:
    """Apply an nft script atomically inside ``namespace``."""
    await run(netns_exec_argv(namespace, ["nft", "-f", "-"]), stdin=script)


async def list_tables(namespace: str | None) -> list[TableRef]:
    """Every nft table in ``namespace``."""
    out = await run(netns_exec_argv(namespace, ["nft", "-j", "list", "tables"]))
    tables: list[TableRef] = []
    for item in json.loads(out or "{}").get("nftables", []):
        table = item.get("table")
        if isinstance(table, dict):
            tables.append(TableRef(namespace, str(table["family"]), str(table["name"])))
    return tables


async def table_exists(ref: TableRef) -> bool:
    """Whether the table exists."""
    tables = await list_tables(ref.namespace)
    return any(t.family == ref.family and t.name == ref.name for t in tables)


async def list_ruleset(ref: TableRef) -> str:
    """The table in nft's text syntax (for inspection and tests)."""
    return await run(netns_exec_argv(ref.namespace, ["nft", "list", "table", ref.family, ref.name]))


async def delete_table(ref: TableRef) -> None:
    """Delete the table and every rule in it; no error if it is already gone."""
    if await table_exists(ref):
        await run(
            netns_exec_argv(ref.namespace, ["nft", "delete", "table", ref.family, ref.name]),
            check=False,
        )
