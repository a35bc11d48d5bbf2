#!/usr/bin/env python3
"""Benchmark: hostile peers against ferry's endpoints, as real processes.

Runs every case of ``hostile_cases/engine.py`` (``ferry serve``, ``ferry
receive``, the NBD server) and, if it exists, ``hostile_cases/vm.py`` (VM
endpoints; a module with a list ``VM_CASES``), each in a fresh directory
against an endpoint started the way users start it, and reports:

* ``cases``: how many ran;
* ``refused_cleanly``: how many the endpoint refused with a typed one-line
  error and no data given away (goal: all);
* ``max_rss_mib``: the largest RSS any endpoint process reached during the
  attacks (VmHWM; goal: below 200);
* ``escaped_files``: files written outside the target directories (goal: 0);
* ``legit_served_after``: whether every endpoint still served a legitimate
  peer after its attack.

Usage: ``bench/hostile.py [--only SUBSTRING] [--json]``. Needs ``setpriv``
(util-linux) and root, to connect as the local user ``nobody``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hostile_cases.base import Case, Outcome
from hostile_cases.engine import ENGINE_CASES


def all_cases() -> list[Case]:
    cases: list[Case] = list(ENGINE_CASES)
    try:
        vm = importlib.import_module("hostile_cases.vm")
    except ModuleNotFoundError as exc:
        if exc.name != "hostile_cases.vm":
            raise
    else:
        cases += list(vm.VM_CASES)
    return cases


def run_case(case: Case) -> Outcome:
    workdir = Path(tempfile.mkdtemp(prefix="ferry-hostile-"))
    workdir.chmod(0o755)  # the other local user must be able to look, not write
    try:
        return case.run(workdir)
    except Exception as exc:  # a crashed case is a failed case, reported like the others
        return Outcome(case.name, case.endpoint, False, f"case crashed: {exc!r}", 0, 0, False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summarize(outcomes: list[Outcome], elapsed_s: float) -> dict[str, Any]:
    return {
        "cases": len(outcomes),
        "refused_cleanly": sum(o.refused_cleanly for o in outcomes),
        "max_rss_mib": round(max((o.max_rss_kib for o in outcomes), default=0) / 1024, 1),
        "escaped_files": sum(o.escaped_files for o in outcomes),
        "legit_served_after": all(o.legit_served_after for o in outcomes),
        "elapsed_s": round(elapsed_s, 1),
        "results": [dataclasses.asdict(o) for o in outcomes],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default="", help="run the cases whose 'endpoint: name' contains this"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    start = time.monotonic()
    outcomes: list[Outcome] = []
    for case in all_cases():
        if args.only not in f"{case.endpoint}: {case.name}":
            continue
        outcome = run_case(case)
        outcomes.append(outcome)
        if not args.json:
            mark = "ok  " if outcome.refused_cleanly and outcome.legit_served_after else "FAIL"
            print(
                f"{mark} {outcome.endpoint:14} {outcome.case}: {outcome.detail} "
                f"(rss {outcome.max_rss_kib / 1024:.0f} MiB)",
                file=sys.stderr,
            )
    summary = summarize(outcomes, time.monotonic() - start)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print({k: v for k, v in summary.items() if k != "results"})
    clean = summary["refused_cleanly"] == summary["cases"] and summary["legit_served_after"]
    return 0 if clean and summary["escaped_files"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
