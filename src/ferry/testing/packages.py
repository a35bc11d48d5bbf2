"""Signed VM packages made the way users make them, for tests and benchmarks.

:class:`Signer` is a signing key and the trust list that trusts it, both
under one directory; :meth:`Signer.package` runs ``ferry key create --trust``
(once) and ``ferry vm snapshot BLUEPRINT -o DIR --package FILE`` with the
``--prepare`` commands given. Hosts that should accept the packages get
:attr:`Signer.env` (``FERRY_TRUST_DIR``, ``FERRY_SIGNING_KEY``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError

FERRY = (sys.executable, "-m", "ferry.cli.main")
SNAPSHOT_TIMEOUT_S = 270.0
"""A TCG boot on a loaded 2-core machine takes tens of seconds; past this the command
hangs, and it is asked where (SIGUSR1) before the suite's 300-s test timeout hits."""
STOP_GRACE_S = 20.0
"""How long a hung command gets to clean up after SIGTERM."""


@dataclass(frozen=True, slots=True)
class Signer:
    root: Path

    @property
    def key(self) -> Path:
        return self.root / "keys" / "signing.key"

    @property
    def trust_dir(self) -> Path:
        return self.root / "trusted"

    @property
    def packages_dir(self) -> Path:
        """Where :meth:`package` puts package files (and nothing else)."""
        return self.root / "packages"

    def snapshot_dir(self, name: str) -> Path:
        """The package directory :meth:`package` snapshotted package ``name`` into (the
        blueprint's name unless the memory was overridden)."""
        return self.root / "snapshots" / name

    @property
    def env(self) -> dict[str, str]:
        return {"FERRY_TRUST_DIR": str(self.trust_dir), "FERRY_SIGNING_KEY": str(self.key)}

    def _ferry(self, *args: str, timeout_s: float) -> None:
        env = {**os.environ, **self.env, "FERRY_RUN_DIR": str(self.root / "run"),
               "FERRY_STATE_DIR": str(self.root / "state")}
        with subprocess.Popen([*FERRY, *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as proc:
            try:
                _, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)  # it logs where its tasks wait
                time.sleep(1.0)
                # SIGTERM first: the command unmounts its FUSE memory and removes its VM
                # on the way out (a SIGKILL would leave the mount behind for every later
                # test); SIGKILL only if it does not end.
                proc.terminate()
                try:
                    _, err = proc.communicate(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                raise FerryError(f"ferry {' '.join(args)}: no exit within {timeout_s:g} s; "
                                 f"its stderr: {err[-8000:]}") from None
        if proc.returncode != 0:
            raise FerryError(f"ferry {' '.join(args)} exited {proc.returncode}: "
                             f"{err[-2000:]}")

    def package(self, blueprint: str, *, prepare: Sequence[str] = (),
                memory_mib: int | None = None) -> Path:
        """Snapshot ``blueprint`` (after the ``prepare`` commands ran in the guest) and
        sign it into ``packages_dir/<name>.ferry``; the package directory stays in
        :meth:`snapshot_dir` ``(name)``. ``memory_mib`` overrides the blueprint's guest
        RAM (``--memory-mib``); the name is then ``<blueprint>-<memory_mib>m``."""
        if not self.key.exists():
            self._ferry("key", "create", "--trust", timeout_s=60)
        name = blueprint if memory_mib is None else f"{blueprint}-{memory_mib}m"
        file = self.packages_dir / f"{name}.ferry"
        file.parent.mkdir(parents=True, exist_ok=True)
        memory = () if memory_mib is None else ("--memory-mib", str(memory_mib))
        self._ferry("vm", "snapshot", blueprint, "-o", str(self.snapshot_dir(name)),
                    "--package", str(file), *memory,
                    *(a for cmd in prepare for a in ("--prepare", cmd)),
                    timeout_s=SNAPSHOT_TIMEOUT_S)
        return file
