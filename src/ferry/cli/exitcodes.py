"""Exit codes of the ``ferry`` command."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # any other ferry error
    USAGE = 2  # bad arguments or configuration
    INTEGRITY = 3  # data did not verify (migration hash mismatch, tampered package)
    PEER = 4  # the peer reported an error or went away
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM
