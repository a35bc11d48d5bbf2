"""Machine-readable output of ferry's commands (``--json``)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()
