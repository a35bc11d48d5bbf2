"""The ``ferry`` command's entry point: a fast path for ``ferry vm ls`` where a daemon runs.

``ferry vm ls`` / ``list`` (with ``--json`` or not) asks this node's daemon over
its UNIX socket (``<run root>/ferryd.sock``) with the stdlib client, so the
process imports ~80 ms of modules instead of the whole CLI (~0.7 s here). Without
a daemon, or on any error talking to it, the full CLI answers as before: the two
paths print the same JSON.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

LIST_COMMANDS = (["vm", "ls"], ["vm", "list"])


def _fast_list(argv: list[str]) -> int | None:
    as_json = argv[2:] == ["--json"]
    if argv[:2] not in LIST_COMMANDS or argv[2:] not in ([], ["--json"]):
        return None
    from ferry.daemon.client import DaemonClient
    from ferry.errors import FerryError
    from ferry.hostconfig import HostConfig

    try:
        host = HostConfig.from_environ(os.environ)
        sock = host.run_root / "ferryd.sock"
        if not sock.exists():
            return None
        vms: list[dict[str, Any]] = DaemonClient.unix(sock).call("GET", "/v1/vms",
                                                                 timeout_s=5.0)
    except (OSError, ValueError, FerryError):
        return None  # no daemon answering: the full CLI reads the run directory itself
    if as_json:
        print(json.dumps(vms, indent=2, sort_keys=True))
        return 0
    rows = [("id", "status", "pid", "forwards", "resume")]
    rows += [(v["vm_id"], v["status"], str(v["pid"] or ""), ", ".join(v["forwards"]),
              f"{v['resume_ms']} ms" if v["resume_ms"] is not None else "") for v in vms]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def main() -> int:
    code = _fast_list(sys.argv[1:])
    if code is not None:
        return code
    from ferry.cli.main import main as full

    return full()


if __name__ == "__main__":
    sys.exit(main())
