"""What a VM holder writes in ``<run dir>/supervisor.json`` (read by :mod:`ferry.vm.registry`).

The record names the holder process (pid + start time, so a recycled pid is not
mistaken for it), its QEMU, and the VM's state as :class:`HolderState`. The file
is rewritten atomically on every change; it is removed with the run dir when the
VM leaves.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ferry.net.state import process_start_time
from ferry.vm.registry import SUPERVISOR_RECORD, this_process, write_json


class HolderState(enum.Enum):
    """Where a held VM is in its life (``ferry vm list`` shows the value)."""

    WARM = "warm"
    """Resumed ahead of need up to QEMU waiting for its state, under a placeholder id,
    until a daemon claims it for a run (:mod:`ferry.daemon.warm`); not listed."""
    STARTING = "starting"
    """``ferry vm run``: the package is being resumed."""
    RECEIVING = "receiving"
    """``ferry vm receive``: the VM is arriving."""
    RUNNING = "running"
    MIGRATING = "migrating"
    """A ``ferry vm migrate`` (to a host or a package) is in progress."""
    STOPPING = "stopping"


@dataclass(slots=True)
class HolderRecord:
    """One holder's ``supervisor.json``; ``status`` is the JSON key of :attr:`state`."""

    vm_id: str
    state: HolderState
    pid: int
    pid_start: int | None
    started_at: float = field(default_factory=time.time)
    origin: str | None = None
    """``migration`` or ``registry`` for a received VM, None for ``ferry vm run``."""
    package_dir: str | None = None
    package_id: str | None = None
    forwards: tuple[str, ...] = ()
    qemu_pid: int | None = None
    qemu_start: int | None = None
    resume: Mapping[str, float] | None = None
    """Resume timings of ``ferry vm run`` (``RunTimings.to_json()``)."""
    arrival: Mapping[str, float | None] | None = None
    """Downtime and time to running of a received VM."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """The VM's labels (:mod:`ferry.vm.labels`)."""
    user_data: Mapping[str, Any] | None = None
    """How its user data went (:meth:`ferry.vm.userdata.UserDataResult.to_json`)."""
    mirror_to: Mapping[str, Any] | None = None
    """Where it is mirrored (:meth:`ferry.vm.mirroring.MirrorSpec.to_json`), if it is."""

    @classmethod
    def for_this_process(cls, vm_id: str, state: HolderState, **fields: Any) -> HolderRecord:
        me = this_process()
        return cls(vm_id=vm_id, state=state, pid=me["pid"], pid_start=me["pid_start"],
                   **fields)

    def set_qemu(self, pid: int | None) -> None:
        self.qemu_pid = pid
        self.qemu_start = process_start_time(pid) if pid else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = data.pop("state").value
        data["forwards"] = list(self.forwards)
        data["labels"] = dict(self.labels)
        return data

    def write(self, run_dir: Path) -> None:
        write_json(run_dir / SUPERVISOR_RECORD, self.to_json())
